"""Compile every numba kernel now: `python -m streamem.precompile`.

numba compiles a kernel at its first call and caches the machine code on disk (beside the
module, or in NUMBA_CACHE_DIR), so only the first process on a machine pays: about 11 s for the
Gaussian family's kernels and 1.5 s for the hidden Markov recursions. Run this once after
installing (the Docker image and `make test` do) so that no consumer or test pays it mid-stream.
"""

from __future__ import annotations

import time

import numpy as np

from streamem.drift import WeightDriftDetector
from streamem.engines.markov_chain import forward_backward, sequence_bounds, viterbi
from streamem.families.cold_kernels import warm_up_cold_kernels
from streamem.families.gaussian_kernels import warm_up_kernels

__all__ = ["compile_kernels"]


def compile_kernels() -> float:
    """Compile (or load from the cache) every kernel; returns the seconds it took."""
    began = time.perf_counter()
    warm_up_kernels()
    warm_up_cold_kernels()
    WeightDriftDetector(2).update_many(np.full((3, 2), 0.5))
    log_b = np.zeros((3, 2))
    bounds = sequence_bounds(None, 3)
    forward_backward(log_b, np.full(2, 0.5), np.full((2, 2), 0.5), *bounds)
    viterbi(log_b, np.full(2, 0.5), np.full((2, 2), 0.5), *bounds)
    return time.perf_counter() - began


if __name__ == "__main__":
    print(f"streamem: numba kernels ready in {compile_kernels():.1f} s")
