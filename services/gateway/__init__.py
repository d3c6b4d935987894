"""Gateway service: zero-shot classification, similarity and embeddings over the two encoders."""
