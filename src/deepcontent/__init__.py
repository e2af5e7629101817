"""deepcontent: content-based music embeddings at catalog scale."""

__version__ = "0.1.0"
