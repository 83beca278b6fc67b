"""streamem: online (stepwise) EM for Gaussian mixtures and mixtures of linear regressions.

The batch estimators (`GaussianMixture`, `RegressionMixture`) run EM to
convergence and are the reference for the online, River-style estimators.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from streamem.compare import ConsistencyReport, compare
from streamem.exceptions import ConvergenceWarning, NotFittedError, OutlierError
from streamem.families.base import SufficientStatistics, Summary
from streamem.families.gaussian import GaussianStats
from streamem.families.markov import HMMStats
from streamem.families.regression import RegressionStats
from streamem.gaussian_hmm import GaussianHMM
from streamem.gaussian_mixture import GaussianMixture
from streamem.markov_switching import MarkovSwitchingRegression
from streamem.online_gmm import OnlineGMM
from streamem.online_hmm import OnlineGaussianHMM
from streamem.online_markov_switching import OnlineMarkovSwitchingRegression
from streamem.online_regression import OnlineRegressionMixture
from streamem.regression_mixture import RegressionMixture

try:
    __version__ = version("streamem")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "ConsistencyReport",
    "compare",
    "ConvergenceWarning",
    "GaussianHMM",
    "GaussianMixture",
    "GaussianStats",
    "HMMStats",
    "MarkovSwitchingRegression",
    "NotFittedError",
    "OnlineGMM",
    "OnlineGaussianHMM",
    "OnlineMarkovSwitchingRegression",
    "OnlineRegressionMixture",
    "OutlierError",
    "RegressionMixture",
    "RegressionStats",
    "Summary",
    "SufficientStatistics",
    "__version__",
]
