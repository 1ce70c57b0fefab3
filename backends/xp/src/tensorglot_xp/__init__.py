"""tensorglot-xp: the spec's kernels on any Python Array API namespace. `plugin` registers it with tensorglot."""

__version__ = "0.1.0"
