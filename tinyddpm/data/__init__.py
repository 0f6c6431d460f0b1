"""Datasets (built-in toy sets and digits; loaders for files on disk), streaming, batching and image I/O."""

from .datasets import DATASETS, Dataset, load_dataset, toy_mixture
from .images import load_image, make_grid, pixels_to_float, read_pixels, save_grid, to_uint8
from .loader import BatchSource, make_batch_source
from .stream import IdxStream, ImageFolderStream, StreamingImages

__all__ = [
    "DATASETS", "BatchSource", "Dataset", "IdxStream", "ImageFolderStream", "StreamingImages", "load_dataset",
    "load_image", "make_batch_source", "make_grid", "pixels_to_float", "read_pixels", "save_grid", "to_uint8",
    "toy_mixture",
]
