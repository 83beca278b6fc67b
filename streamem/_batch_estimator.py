"""What the two batch estimators share: argument checks, restarts, convergence report."""

from __future__ import annotations

import warnings

import numpy as np

from streamem._validation import check_n_components, check_positive
from streamem.engines.batch import EMResult, fit_with_restarts
from streamem.exceptions import ConvergenceWarning, NotFittedError
from streamem.families.base import check_statistics_fit

__all__ = ["BatchMixture", "as_generator"]


def as_generator(random_state) -> np.random.Generator:
    """A NumPy Generator from None, an int seed or a Generator."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, (int, np.integer)):
        return np.random.default_rng(random_state)
    raise ValueError(f"random_state must be None, an int or a numpy Generator, got {random_state!r}")


class BatchMixture:
    """Base of `GaussianMixture` and `RegressionMixture` (not public)."""

    _fitted_attribute = "weights_"

    def _check_common(self) -> int:
        n_components = check_n_components(self.n_components)
        check_positive(self.tol, "tol", allow_zero=True)
        check_positive(self.max_iter, "max_iter", integer=True)
        check_positive(self.n_init, "n_init", integer=True)
        return n_components

    def _run(self, family, batch, initial_params, n_features: int) -> EMResult:
        result = fit_with_restarts(
            family,
            batch,
            initial_params,
            n_init=self.n_init,
            tol=self.tol,
            max_iter=self.max_iter,
            n_features=n_features,
            rng=as_generator(self.random_state),
        )
        self._stats = result.stats  # the E-step statistics behind the final parameters
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.log_likelihoods_ = list(result.log_likelihoods)
        self.lower_bound_ = result.log_likelihoods[-1]
        self.n_features_in_ = n_features
        if not result.converged:
            warnings.warn(
                f"EM did not converge within max_iter={self.max_iter} iterations "
                f"(last change of the mean log-likelihood above tol={self.tol}); "
                "raise max_iter or tol, or check the initialisation",
                ConvergenceWarning,
                stacklevel=3,
            )
        return result

    def apply(self, statistics) -> None:
        """Set the parameters to the M-step of `statistics` (as `summarize` returns them): one EM
        iteration is `model.apply(model.summarize(X).statistics)`; statistics of several workers'
        data, added, give the M-step of all their data (the statistics must be about this model's
        components and features: a wrong type or shape raises ValueError)."""
        self._check_fitted()
        check_statistics_fit(statistics, type(self).__name__, type(self._stats), self._stats.shapes)
        self._set_params(self._family().m_step(statistics))
        self._stats = statistics

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attribute):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._param_names())
        return f"{type(self).__name__}({params})"

    @classmethod
    def _param_names(cls) -> list[str]:
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """Constructor arguments, as scikit-learn's `get_params`."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        for name, value in params.items():
            if name not in self._param_names():
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self
