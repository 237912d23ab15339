"""Drift kinds of eplb_opt.workloads.generate (issue 16, part 3): distinct, seeded,
recorded, and the default output unchanged."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from eplb_opt.workloads import DRIFT_KINDS, drift_parameters, generate

PRESET = "deepseek-v2-lite"          # 26 x 64: fast
KINDS = tuple(DRIFT_KINDS)


def test_kinds_are_the_five_of_the_issue():
    assert set(KINDS) == {"steady", "walk", "switch", "periodic", "burst"}


@pytest.mark.parametrize("kind", KINDS)
def test_kind_is_deterministic_per_seed(kind):
    a = generate(PRESET, windows=8, seed=3, drift=kind)
    b = generate(PRESET, windows=8, seed=3, drift=kind)
    c = generate(PRESET, windows=8, seed=4, drift=kind)
    assert a.shape == (8, 26, 64) and a.dtype == np.float64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Every window routes tokens x top_k tokens per layer.
    assert np.all(a.sum(axis=2) == 16384 * 6)


def test_kinds_differ_from_each_other_and_from_the_default():
    out = {k: generate(PRESET, windows=12, seed=0, drift=k) for k in KINDS}
    out["default"] = generate(PRESET, windows=12, seed=0)
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(out[a], out[b]), (a, b)
    # Same base popularity: window 0 of every kind but periodic (whose first window is
    # the base mix too, but drawn after the second mix) is the same draw.
    assert np.array_equal(out["steady"][0], out["walk"][0])


def _change(x: np.ndarray) -> np.ndarray:
    """Share of routed tokens that move between consecutive windows."""
    return np.abs(np.diff(x, axis=0)).sum(axis=(1, 2)) / x[0].sum()


def test_each_kind_changes_the_way_it_says():
    ch = {k: _change(generate("deepseek-v3-prefill", windows=16, seed=1, drift=k)[:, :16]) for k in KINDS}
    noise = ch["steady"].mean()
    assert ch["steady"].std() < 0.1 * noise                      # sampling noise only
    assert ch["walk"].min() > 1.5 * noise                         # every window moves
    assert (ch["switch"] > 5 * noise).any() and (ch["switch"] < 1.3 * noise).sum() >= 5   # rare jumps
    per = generate("deepseek-v3-prefill", windows=17, seed=1, drift="periodic")
    period = DRIFT_KINDS["periodic"]["period"]
    # One period later the mix is the same: only sampling noise apart.
    assert np.abs(per[period] - per[0]).sum() / per[0].sum() < 1.3 * noise
    assert np.abs(per[period // 2] - per[0]).sum() / per[0].sum() > 3 * noise
    assert (ch["burst"] > 2 * noise).any() and (ch["burst"] < 1.3 * noise).any()


def test_parameters_are_recorded_and_json_able():
    for k in KINDS:
        prm = drift_parameters(k)
        assert prm["kind"] == k and prm["skew"] == 0.75
        assert {key: prm[key] for key in DRIFT_KINDS[k]} == DRIFT_KINDS[k]
        json.dumps(prm)
    with pytest.raises(ValueError, match="drift"):
        drift_parameters("sideways")


def test_bad_kind_and_conflicting_legacy_arguments():
    with pytest.raises(ValueError, match="'sideways'"):
        generate(PRESET, drift="sideways")
    with pytest.raises(ValueError, match="mix_shift"):
        generate(PRESET, drift="walk", mix_shift=0.5)


def test_default_output_unchanged():
    # Recorded before the drift kinds existed: benchmarks, golden outputs and tests
    # built on generate()'s defaults keep their inputs.
    got = hashlib.sha1(generate("deepseek-v3-prefill", windows=3, seed=7).tobytes()).hexdigest()
    assert got == "3f5ab9de52fd834ee1c7004076c0f9a59518f366"
