"""NumPy layers: filled by the layers issue (see `tensorglot.layers`)."""
