"""The encoder runtime the vision and text services are built from: a verified tower, its batcher."""
