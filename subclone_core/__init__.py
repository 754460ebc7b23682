"""Weight subcloning: initialize a smaller transformer from a larger pretrained one (arXiv:2312.09299)."""

__version__ = "0.1.0"
