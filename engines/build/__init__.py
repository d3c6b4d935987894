"""Build half of engines: model registry, ONNX export and bundle writing (needs torch and open_clip)."""
