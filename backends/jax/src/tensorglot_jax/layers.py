"""JAX layers: see the spec, `tensorglot.layers` (filled when the layers spec lands)."""
