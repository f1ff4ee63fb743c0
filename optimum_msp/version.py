"""The library's version, in a module of its own so that cache keys can include it without importing the package."""

__version__ = "0.1.0.dev0"
