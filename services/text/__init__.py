"""Text encoder service: texts in, embeddings out."""
