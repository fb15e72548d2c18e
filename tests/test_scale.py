"""Speed-and-scale paths: problems sent to workers, the pipelined driver, streaming actors, ``plan`` counts and
the scaling study.  Every path must give the numbers of the simple one (bit for bit where stated)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray import cloudpickle

import lemmse_ray as lm

F64 = torch.float64


def test_pickled_generic_problem_carries_no_dense_covariance():
    problem = lm.LinearInverseProblem(lambda x: x, None, label="identity")
    cov = problem.covariance((3, 64, 64))  # a dense (12288)² matrix, 1.2 GB, cached in the problem
    assert cov.matrix.nbytes > 10**9
    assert len(cloudpickle.dumps(problem)) <= 10**6
    # a copy re-probes what it needs: same covariance as the original's
    small = lm.LinearInverseProblem(lambda y: 2.0 * y, lambda y: 0.5 * y, label="half")
    original = small.covariance((1, 4, 4)).matrix
    copy = cloudpickle.loads(cloudpickle.dumps(small))
    assert copy._cov_cache == {}
    np.testing.assert_array_equal(copy.covariance((1, 4, 4)).matrix, np.eye(16) * 0.25)
    np.testing.assert_array_equal(original, np.eye(16) * 0.25)
