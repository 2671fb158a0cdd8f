"""delve: how much of each layer's width a network's data actually uses, measured while it trains."""

import logging

from delve.covariance import TorchCovarianceMatrix
from delve.tools import reconstruct_csv_from_npy_data
from delve.tracker import CheckLayerSat, SaturationTracker

__version__ = "0.2.0"

__all__ = [
    "CheckLayerSat",
    "SaturationTracker",
    "TorchCovarianceMatrix",
    "__version__",
    "reconstruct_csv_from_npy_data",
]

# A library never configures logging for its user; it only makes sure it stays silent
# unless asked.
logging.getLogger(__name__).addHandler(logging.NullHandler())
