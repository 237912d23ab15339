"""solve(history=..., forecast=...) (issue 16, part 2): plans for the window to come.

One meaning each: a 3-D ``weight`` holds the windows a plan serves (``objective``);
``history`` holds windows already past, ``weight`` then the latest one, and ``forecast``
says how they become the next window's loads.  Without history nothing changes."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_opt import InvalidProblemError, solve
from eplb_opt.metrics import gpu_loads
from eplb_opt.problem import (DEFAULT_FORECAST, FORECAST_PARAMETERS, FORECASTS, HISTORY_CONFLICTS,
                              forecast_loads)
from eplb_opt.workloads import generate

TOPO = dict(num_replicas=80, num_groups=1, num_nodes=1, num_gpus=8)


@pytest.fixture(scope="module")
def w():
    return generate("deepseek-v2-lite", windows=5, seed=2, drift="periodic")[:, :6]   # [5, 6, 64]


def test_no_history_is_exactly_today(w):
    base = solve(w[-1], **TOPO)
    for f in (None, *FORECASTS):
        r = solve(w[-1], **TOPO, forecast=f)
        assert np.array_equal(r.plan.to_numpy()[0], base.plan.to_numpy()[0])
        assert r.balancedness == base.balancedness and r.events == base.events
    assert np.array_equal(solve(w[-1], **TOPO, history=None).plan.to_numpy()[0], base.plan.to_numpy()[0])


def test_last_ignores_history(w):
    base = solve(w[-1], **TOPO)
    r = solve(w[-1], **TOPO, history=w[:-1], forecast="last")
    assert np.array_equal(r.plan.to_numpy()[0], base.plan.to_numpy()[0])
    assert r.balancedness == base.balancedness
    assert any("forecast='last'" in e for e in r.events)


def test_point_forecasts_are_weighted_means(w):
    mean, obj = forecast_loads(w, "mean")
    assert obj == "sum" and mean.shape == (1, *w.shape[1:])
    np.testing.assert_allclose(mean[0], w.mean(axis=0))
    ema, _ = forecast_loads(w, "ema")
    hl = FORECAST_PARAMETERS["ema_halflife"]
    wts = 0.5 ** (np.arange(len(w))[::-1] / hl)
    np.testing.assert_allclose(ema[0], np.tensordot(wts / wts.sum(), w, axes=1))
    # A plan for a point forecast is the plan for those loads as a weight.
    r = solve(w[-1], **TOPO, history=w[:-1], forecast="mean")
    assert np.array_equal(r.plan.to_numpy()[0], solve(w.mean(axis=0), **TOPO).plan.to_numpy()[0])


def test_default_forecast_with_history(w):
    assert DEFAULT_FORECAST in FORECASTS
    a = solve(w[-1], **TOPO, history=w[:-1])
    b = solve(w[-1], **TOPO, history=w[:-1], forecast=DEFAULT_FORECAST)
    assert np.array_equal(a.plan.to_numpy()[0], b.plan.to_numpy()[0])


@pytest.mark.parametrize("objective", ["worst", "mean"])
def test_windows_hedges_are_the_window_objective_over_history(w, objective):
    r = solve(w[-1], **TOPO, history=w[:-1], forecast=f"windows-{objective}")
    same = solve(w, **TOPO, objective=objective)
    assert np.array_equal(r.plan.to_numpy()[0], same.plan.to_numpy()[0])
    assert r.objective == objective and len(r.window_balancedness) == len(w)


def test_hedge_lowers_its_objective_over_the_windows(w):
    plain = solve(w[-1], **TOPO).plan.to_numpy()[0]
    hedged = solve(w[-1], **TOPO, history=w[:-1], forecast="windows-worst").plan.to_numpy()[0]
    worst = lambda ph: np.stack([gpu_loads(x, ph, 8).max(axis=1) for x in w]).max(axis=0).sum()  # noqa: E731
    assert worst(hedged) <= worst(plain)


def test_windows_ema_is_the_mean_objective_over_recency_weighted_windows(w):
    hl = FORECAST_PARAMETERS["ema_halflife"]
    wts = 0.5 ** (np.arange(len(w))[::-1] / hl)
    scaled = w * (wts / wts.sum())[:, None, None]
    r = solve(w[-1], **TOPO, history=w[:-1], forecast="windows-ema")
    same = solve(scaled, **TOPO, objective="mean")
    assert np.array_equal(r.plan.to_numpy()[0], same.plan.to_numpy()[0])
    loads, obj = forecast_loads(w, "windows-ema")
    assert obj == "mean"
    np.testing.assert_allclose(loads.sum(axis=0), forecast_loads(w, "ema")[0][0])


def test_default_is_the_point_forecast_where_a_hedge_is_refused(w):
    prev = solve(w[0], **TOPO).plan.to_numpy()[0]
    r = solve(w[-1], **TOPO, history=w[:-1], previous=prev)
    assert any("forecast='ema'" in e for e in r.events)
    assert np.array_equal(r.plan.to_numpy()[0],
                          solve(w[-1], **TOPO, history=w[:-1], previous=prev, forecast="ema").plan.to_numpy()[0])


def test_one_past_window_as_2d_history(w):
    a = solve(w[-1], **TOPO, history=w[-2], forecast="mean")
    b = solve(w[-1], **TOPO, history=w[-2:-1], forecast="mean")
    assert np.array_equal(a.plan.to_numpy()[0], b.plan.to_numpy()[0])


@pytest.mark.parametrize("kw, match", [
    (dict(weight3=True, history=True), r"history with a 3-D weight of shape \(5, 6, 64\)"),
    (dict(history=True, objective="worst"), r"objective='worst' with history.*forecast='windows-worst'"),
    (dict(weight3=True, forecast="ema"), r"forecast='ema' with a 3-D weight of shape \(5, 6, 64\) and no history"),
    (dict(history=True, forecast="median"), r"forecast must be one of .*got 'median'"),
    (dict(history="short"), r"history has shape \(4, 3, 64\)"),
    (dict(history=True, forecast="windows-worst", policy="spill", num_groups=2, num_nodes=1),
     r"policy='spill' with forecast='windows-worst'"),
    (dict(history=True, forecast="windows-mean", previous=True), r"previous with forecast='windows-mean'"),
])
def test_conflicts_name_the_argument_and_value(w, kw, match):
    kw = dict(kw)
    weight = w if kw.pop("weight3", False) else w[-1]
    h = kw.pop("history", None)
    if h is True:
        kw["history"] = w[:-1]
    elif h == "short":
        kw["history"] = w[:-1, :3]
    if kw.pop("previous", None):
        kw["previous"] = solve(w[-1], **TOPO).plan.to_numpy()[0]
    topo = {**TOPO, **{k: kw.pop(k) for k in ("num_groups", "num_nodes") if k in kw}}
    with pytest.raises(InvalidProblemError, match=match) as info:
        solve(weight, **topo, **kw)
    assert isinstance(info.value, ValueError)


def test_history_is_validated_like_weight(w):
    bad = np.array(w[:-1])
    bad[0, 1, 2] = np.nan
    with pytest.raises(InvalidProblemError, match=r"history must be finite.*\[window 0, layer 1, expert 2\]"):
        solve(w[-1], **TOPO, history=bad)


def test_history_conflicts_table_is_checked_in_order():
    assert len(HISTORY_CONFLICTS) == 3


def test_point_forecast_works_with_previous_and_masked_gpus(w):
    prev = solve(w[0], **TOPO).plan.to_numpy()[0]
    r = solve(w[-1], **TOPO, history=w[:-1], previous=prev, max_balance_loss=0.01)
    assert r.migration is not None
    m = solve(w[-1], **TOPO, history=w[:-1], masked_gpus=[3])
    assert (m.plan.to_numpy()[0].reshape(6, 8, -1)[:, 3] == -1).all()
