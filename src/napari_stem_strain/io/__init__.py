"""Reading 4D-STEM files into lazy :class:`Dataset` objects, and result files."""

from .dataset import Calibration, Dataset
from .errors import DataError
from .readers import SUPPORTED_SUFFIXES, list_4d_arrays, open_dataset

__all__ = [
    "Calibration",
    "Dataset",
    "DataError",
    "SUPPORTED_SUFFIXES",
    "list_4d_arrays",
    "open_dataset",
]
