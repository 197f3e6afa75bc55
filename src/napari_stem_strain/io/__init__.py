"""Reading 4D-STEM files into lazy :class:`Dataset` objects, and result files."""

from .dataset import Calibration, Dataset
from .errors import DataError

__all__ = ["Calibration", "Dataset", "DataError"]
