"""The engine's version, recorded in model cards."""

__version__ = "0.1.0"
