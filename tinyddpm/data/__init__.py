"""Datasets (built-in toy sets and digits; loaders for files on disk) and image I/O."""
