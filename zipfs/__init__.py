"""zipfs: compressed, deduplicated storage for model checkpoints, served as plain files."""

__version__ = "0.1.0"
