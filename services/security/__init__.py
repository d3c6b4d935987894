"""Who may call and how the bytes travel: credentials, roles and quotas (auth), certificates (tls)."""
