"""Data: dataset registration, the embedded ``shapes`` generator, mappers and loaders."""
from up2.data import datasets  # noqa: F401  (registers the built-in datasets)
