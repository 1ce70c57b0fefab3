"""JAX parallel strategies: filled by the parallel issue (see `tensorglot.parallel`)."""
