"""chatd: a self-hosted chat server on Trio, built as supervised actors."""

__all__ = ["__version__"]

__version__ = "0.1.0"
