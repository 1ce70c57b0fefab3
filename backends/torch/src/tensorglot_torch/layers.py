"""PyTorch layers: see the spec, `tensorglot.layers`."""
