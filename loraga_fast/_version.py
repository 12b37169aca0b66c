"""The package version, in a module of its own so that every floor can read it without importing the package
face (``loraga_fast/__init__.py``)."""

__version__ = "0.2.0"
