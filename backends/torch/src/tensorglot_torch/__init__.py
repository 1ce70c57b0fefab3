"""tensorglot-torch: the PyTorch backend. Import is cheap; `plugin` registers it with tensorglot."""

__version__ = "0.1.0"
