"""Bad input: our own exception types, naming the argument and the value."""

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, EplbOptError

W = np.ones((2, 8))


def call(weight=W, num_replicas=8, num_groups=2, num_nodes=2, num_gpus=4, **kw):
    return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, **kw)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(weight=np.ones(8)), InvalidProblemError, r"weight must be 2-D.*\(8,\)"),
        (dict(weight=np.ones((2, 3, 8))), InvalidProblemError, r"weight must be 2-D.*\(2, 3, 8\)"),
        (dict(weight=np.ones((0, 8))), InvalidProblemError, r"no layers"),
        (dict(weight=np.ones((2, 0))), InvalidProblemError, r"no experts"),
        (dict(weight=np.array([[1.0, np.nan] * 4] * 2)), InvalidProblemError, r"finite.*\[layer 0, expert 1\] = nan"),
        (dict(weight=np.array([[1.0, np.inf] * 4] * 2)), InvalidProblemError, r"finite.*inf"),
        (dict(weight=np.array([[1.0, -2.0] * 4] * 2)), InvalidProblemError, r"non-negative.*-2\.0"),
        (dict(weight=np.ones((2, 8), dtype=complex)), InvalidTypeError, r"complex"),
        (dict(weight=torch.ones((2, 8), dtype=torch.complex64)), InvalidTypeError, r"complex"),
        (dict(weight=np.array([["a"] * 8] * 2)), InvalidTypeError, r"numeric"),
        (dict(weight=np.ones((2, 8), dtype=bool)), InvalidTypeError, r"numeric.*bool"),
        (dict(weight=torch.ones((2, 8), dtype=torch.bool)), InvalidTypeError, r"bool"),
        (dict(weight=None), InvalidTypeError, r"weight.*None"),
        (dict(weight=[[1, 2], [3]]), InvalidTypeError, r"weight"),
        (dict(num_replicas=6), InvalidProblemError, r"num_replicas=6 is below the number of experts 8"),
        (dict(num_replicas=10), InvalidProblemError, r"num_replicas=10 is not a multiple of num_gpus=4"),
        (dict(num_replicas=8.0), InvalidTypeError, r"num_replicas must be a positive integer, got float 8.0"),
        (dict(num_replicas="8"), InvalidTypeError, r"num_replicas.*str"),
        (dict(num_gpus=0), InvalidProblemError, r"num_gpus must be a positive integer, got 0"),
        (dict(num_gpus=-4), InvalidProblemError, r"num_gpus.*-4"),
        (dict(num_nodes=True), InvalidTypeError, r"num_nodes.*bool"),
        (dict(num_groups=0), InvalidProblemError, r"num_groups.*0"),
        (dict(time_limit=-1), InvalidProblemError, r"time_limit must be >= 0.*-1"),
        (dict(time_limit=float("nan")), InvalidProblemError, r"time_limit"),
        (dict(time_limit="1s"), InvalidTypeError, r"time_limit.*'1s'"),
        (dict(mode="fast"), InvalidProblemError, r"mode must be one of.*'fast'"),
        (dict(mode=1), InvalidTypeError, r"mode"),
        (dict(policy="local"), InvalidProblemError, r"policy must be one of.*'local'"),
        (dict(seed=-1), InvalidProblemError, r"seed.*-1"),
        (dict(seed=1.5), InvalidTypeError, r"seed.*1.5"),
        # Hierarchical rules (auto picks hierarchical: 2 groups over 2 nodes).
        (dict(num_gpus=4, num_nodes=2, num_groups=2, weight=np.ones((2, 9)), num_replicas=12),
         InvalidProblemError, r"expert count 9 to be a multiple of num_groups=2"),
        (dict(num_gpus=3, num_nodes=2, num_groups=2, num_replicas=9), InvalidProblemError,
         r"num_gpus=3 to be a multiple of num_nodes=2"),
        (dict(num_groups=3, num_nodes=2, policy="hierarchical", weight=np.ones((2, 9)), num_replicas=12),
         InvalidProblemError, r"num_groups=3 to be a multiple of num_nodes=2"),
    ],
)
def test_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call(**kwargs)
    assert isinstance(info.value, EplbOptError)


def test_error_classes_are_value_and_type_errors():
    assert issubclass(InvalidProblemError, ValueError)
    assert issubclass(InvalidTypeError, TypeError)
    with pytest.raises(ValueError):
        call(num_replicas=6)
    with pytest.raises(TypeError):
        call(num_replicas=8.5)


def test_solve_validates_tolerance():
    with pytest.raises(InvalidProblemError, match="tolerance.*2"):
        eplb_opt.solve(W, num_replicas=8, num_gpus=4, tolerance=2)
    with pytest.raises(InvalidTypeError, match="tolerance"):
        eplb_opt.solve(W, num_replicas=8, num_gpus=4, tolerance="x")


def test_solve_requires_keywords():
    with pytest.raises(TypeError):
        eplb_opt.solve(W, 8, 2, 2, 4)  # noqa - sizes are keyword-only


def test_input_is_not_modified():
    w = np.arange(16, dtype=np.float64).reshape(2, 8)
    before = w.copy()
    t = torch.tensor(w)
    call(weight=w)
    call(weight=t)
    assert np.array_equal(w, before) and torch.equal(t, torch.tensor(before))
