"""Vision encoder service: encoded images in, embeddings out."""
