"""gmmvit: a reproducible benchmark of locality masks (GMM, ELM, ...) for Vision Transformers
trained from scratch on small datasets."""

__version__ = "0.1.0"
