"""Model families: e-step (log responsibilities), sufficient statistics, m-step."""

from streamem.families.base import SufficientStatistics
from streamem.families.gaussian import (
    COVARIANCE_TYPES,
    GaussianFamily,
    GaussianParams,
    GaussianStats,
)
from streamem.families.regression import RegressionFamily, RegressionParams, RegressionStats

__all__ = [
    "COVARIANCE_TYPES",
    "GaussianFamily",
    "GaussianParams",
    "GaussianStats",
    "RegressionFamily",
    "RegressionParams",
    "RegressionStats",
    "SufficientStatistics",
]
