"""PyTorch parallel strategies: placeholder; the parallel issue fills this module (see `tensorglot.parallel`)."""
