"""Import path of the accumulator kept for code written against the original API."""

from delve.covariance import TorchCovarianceMatrix

__all__ = ["TorchCovarianceMatrix"]
