"""NumPy parallel strategies: the cost model lives in `tensorglot.parallel`; strategies come with the parallel issue."""
