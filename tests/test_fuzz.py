"""Property-based fuzzing of every entry point (hypothesis).

Random shapes, topologies, load distributions (zeros, ties, extreme skew, huge and tiny
magnitudes, every input dtype) through ``solve`` (both modes, every policy, windows,
``previous``, masked GPUs), ``rebalance_experts``, the vLLM and SGLang integrations and
the CLI; and random garbage through the validators and the trace readers.  Properties:
every returned plan passes the independent verifier; lower bound <= max load; exact
never worse than heuristic; same input and seed, same plan where determinism is
promised; bad input raises one of our errors, nothing else.

The ``ci`` profile (default) keeps the run short; ``HYPOTHESIS_PROFILE=long`` runs the
recorded long campaign (``python -m benchmarks.run_fuzz``).  Each test's example count is
a share of the profile's ``max_examples`` (slow entry points get a smaller share).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import eplb_opt
from eplb_opt import plan_violations
from eplb_opt.errors import EplbOptError

from .oracle import assert_consistent_certificate


def share(fraction: float, least: int = 5) -> settings:
    """This test's example count: ``fraction`` of the active profile's."""
    n = max(least, int(settings.default.max_examples * fraction))
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# -- strategies -----------------------------------------------------------------------

LOAD_KINDS = ["pareto", "uniform", "zeros", "all-zero", "ties", "one-hot", "skew", "huge", "tiny",
              "mixed-magnitude", "int", "big-int", "near-max", "dead-groups"]
DTYPES = ["float64", "float32", "int64", "int32", "torch-float64", "torch-bfloat16", "torch-int64", "list"]


@st.composite
def topologies(draw, max_layers: int = 4):
    nodes = draw(st.integers(1, 4))
    gpus_per_node = draw(st.integers(1, 4))
    G = nodes * gpus_per_node
    if draw(st.booleans()):
        groups = nodes * draw(st.integers(1, 3))             # hierarchical possible
    else:
        groups = draw(st.integers(1, 6))                     # may not divide the nodes
    E = groups * draw(st.integers(1, 6))
    k_min = -(-E // G)
    k = draw(st.integers(k_min, k_min + 3))
    return dict(L=draw(st.integers(1, max_layers)), E=E, R=G * k, groups=groups, nodes=nodes, G=G)


def make_loads(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    E = shape[-1]
    if kind == "pareto":
        return rng.pareto(0.8, size=shape) * 100
    if kind == "uniform":
        return rng.random(shape)
    if kind == "zeros":
        w = np.zeros(shape)
        w[..., : max(1, E // 3)] = rng.random(shape[:-1] + (max(1, E // 3),))
        return w
    if kind == "all-zero":
        return np.zeros(shape)
    if kind == "ties":
        return np.full(shape, 7.0)
    if kind == "one-hot":
        w = np.zeros(shape)
        w[..., rng.integers(0, E)] = 1e6
        return w
    if kind == "skew":
        w = np.ones(shape)
        w[..., 0] = 1e12
        return w
    if kind == "huge":
        return rng.random(shape) * 2.0**45
    if kind == "tiny":
        return rng.random(shape) * 1e-300
    if kind == "mixed-magnitude":
        return np.where(rng.random(shape) < 0.5, 1e-200, 1e200) * rng.random(shape)
    if kind == "int":
        return rng.integers(0, 1000, size=shape).astype(np.float64)
    if kind == "big-int":
        return rng.integers(2**54, 2**60, size=shape).astype(np.float64)
    if kind == "near-max":
        return rng.random(shape) * 1e300
    # dead-groups: whole stretches of experts with no load
    w = rng.pareto(1.0, size=shape)
    w[..., : E // 2] = 0.0
    return w


def cast(w: np.ndarray, dtype: str):
    """``w`` in another container/dtype, and the float64 values the library will see."""
    if dtype == "float64":
        return w, w
    if dtype == "float32" and np.abs(w).max(initial=0.0) < 1e38:
        x = w.astype(np.float32)
        return x, x.astype(np.float64)
    if dtype in ("int64", "int32"):
        hi = 2.0**62 if dtype == "int64" else 2.0**31 - 1   # exactly representable, no cast overflow
        x = np.clip(np.round(w), 0, hi).astype(dtype)
        return x, x.astype(np.float64)
    if dtype == "torch-float64":
        return torch.from_numpy(w.copy()), w
    if dtype == "torch-bfloat16" and np.abs(w).max(initial=0.0) < 1e38:
        x = torch.from_numpy(w.copy()).to(torch.bfloat16)
        return x, x.to(torch.float64).numpy()
    if dtype == "torch-int64":
        x = torch.from_numpy(np.clip(np.round(w), 0, 2**62).astype(np.int64))
        return x, x.numpy().astype(np.float64)
    return w.tolist(), w


@st.composite
def problems(draw, max_layers: int = 4, windows: bool = False):
    t = draw(topologies(max_layers))
    kind = draw(st.sampled_from(LOAD_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = draw(st.integers(2, 3)) if windows else None
    shape = (t["L"], t["E"]) if W is None else (W, t["L"], t["E"])
    w = make_loads(kind, shape, rng)
    dtype = draw(st.sampled_from(DTYPES))
    raw, seen = cast(w, dtype)
    return t, raw, seen, kind


def kwargs(t: dict, policy: str = "auto") -> dict:
    return dict(num_replicas=t["R"], num_groups=t["groups"], num_nodes=t["nodes"], num_gpus=t["G"], policy=policy)


def policies_for(t: dict) -> list[str]:
    ok = ["auto", "global"]
    if t["groups"] % t["nodes"] == 0:
        ok += ["hierarchical", "spill"]
    return ok


def check_result(r, t: dict, seen: np.ndarray, masked: np.ndarray | None = None) -> None:
    """The independent verifier passes and the reported figures hold together."""
    p, m, c = r.plan.to_numpy()
    hier = r.policy == "hierarchical"
    assert plan_violations(
        p, t["E"], t["R"], t["G"], num_groups=t["groups"], num_nodes=t["nodes"], hierarchical=hier,
        log2phy=m, logcnt=c, masked=masked,
    ) == []
    assert np.isfinite(r.max_load).all() and np.isfinite(r.lower_bound).all()
    assert_consistent_certificate(r)
    assert ((r.gap >= 0) & (r.gap <= 1)).all()
    assert 0.0 <= r.balancedness <= 1.0 + 1e-12
    # The reported max load is the plan's, recomputed here from the loads.
    loads = seen if seen.ndim == 2 else seen.sum(axis=0)
    if r.objective == "sum":
        recomputed = eplb_opt.gpu_loads(loads, p, t["G"]).max(axis=1)
        assert np.allclose(r.max_load, recomputed, rtol=1e-9, atol=0)


# -- solve, heuristic mode --------------------------------------------------------------

@share(1.0)
@given(problems(), st.data())
def test_solve_heuristic_every_policy(args, data):
    t, raw, seen, _ = args
    policy = data.draw(st.sampled_from(policies_for(t)))
    allow_dup = data.draw(st.booleans()) or t["R"] // t["G"] > t["E"] // max(1, t["nodes"])
    kw = kwargs(t, policy)
    try:
        r = eplb_opt.solve(raw, **kw, allow_duplicates=allow_dup)
    except eplb_opt.InvalidProblemError as exc:      # allow_duplicates=False can be impossible
        assert "allow_duplicates" in str(exc)
        return
    check_result(r, t, seen)
    if not allow_dup:
        assert plan_violations(r.plan.phy2log, t["E"], t["R"], t["G"], allow_duplicates=False) == []
    again = eplb_opt.solve(raw, **kw, allow_duplicates=allow_dup)
    assert torch.equal(again.plan.phy2log, r.plan.phy2log)          # deterministic


@share(0.5)
@given(problems(windows=True), st.sampled_from(["worst", "mean", "sum"]), st.sampled_from(["heuristic", "exact"]))
def test_solve_over_windows(args, objective, mode):
    t, raw, seen, _ = args
    r = eplb_opt.solve(raw, **kwargs(t), objective=objective, mode=mode, time_limit=0.1)
    check_result(r, t, seen)
    assert r.window_balancedness is not None and len(r.window_balancedness) == seen.shape[0]


@share(0.5)
@given(problems(), st.data())
def test_solve_with_masked_gpus(args, data):
    t, raw, seen, _ = args
    k = t["R"] // t["G"]
    most = t["G"] - -(-t["E"] // k)               # keep enough active GPUs for every expert
    assume(most >= 1)
    n = data.draw(st.integers(1, most))
    ids = sorted(data.draw(st.lists(st.integers(0, t["G"] - 1), min_size=n, max_size=n, unique=True)))
    mode = data.draw(st.sampled_from(["heuristic", "exact"]))
    r = eplb_opt.solve(raw, **kwargs(t), masked_gpus=ids, mode=mode, time_limit=0.1)
    mask = np.zeros((t["L"], t["G"]), dtype=bool)
    mask[:, ids] = True
    check_result(r, t, seen, masked=mask)


@share(0.5)
@given(problems(), st.data())
def test_solve_from_a_previous_plan(args, data):
    t, raw, seen, kind = args
    policy = data.draw(st.sampled_from(["auto", "global"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    older = make_loads("pareto", (t["L"], t["E"]), rng)
    prev = eplb_opt.solve(older, **kwargs(t, policy)).plan
    mbl = data.draw(st.sampled_from([0.0, 0.005, 0.05]))
    r = eplb_opt.solve(raw, **kwargs(t, policy), previous=prev, max_balance_loss=mbl)
    check_result(r, t, seen)
    fresh = eplb_opt.solve(raw, **kwargs(t, policy))
    assert (r.max_load <= fresh.max_load * (1 + mbl) * (1 + 1e-9) + 1e-300).all()
    assert (r.moves >= 0).all() and int(r.moves.sum()) == int(r.migration.moves.sum())
    same = eplb_opt.solve(raw, **kwargs(t, policy), previous=prev, max_balance_loss=mbl)
    assert torch.equal(same.plan.phy2log, r.plan.phy2log)


# -- solve, exact mode ------------------------------------------------------------------

@share(0.3)
@given(problems(max_layers=3), st.data())
def test_exact_never_worse_than_heuristic(args, data):
    t, raw, seen, _ = args
    policy = data.draw(st.sampled_from([p for p in policies_for(t) if p != "spill"]))
    deterministic = data.draw(st.booleans())
    limit = data.draw(st.sampled_from([0.0, 0.05, 0.2]))
    kw = kwargs(t, policy)
    h = eplb_opt.solve(raw, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e = eplb_opt.solve(raw, **kw, mode="exact", time_limit=limit, deterministic=deterministic)
    check_result(e, t, seen)
    assert (e.max_load <= h.max_load * (1 + 1e-12)).all()
    assert (e.lower_bound >= h.lower_bound * (1 - 1e-12)).all()
    assert not any("failed" in ev or "crashed" in ev or "died" in ev for ev in e.events), e.events
    if deterministic:
        again = eplb_opt.solve(raw, **kw, mode="exact", time_limit=limit, deterministic=True)
        assert torch.equal(again.plan.phy2log, e.plan.phy2log)


# -- the DeepSeek-compatible call and the integrations ----------------------------------

@share(0.5)
@given(problems())
def test_rebalance_experts_maps_verify(args):
    t, raw, seen, _ = args
    p, m, c = eplb_opt.rebalance_experts(
        raw if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw, dtype=np.float64)),
        t["R"], t["groups"], t["nodes"], t["G"],
    )
    assert p.dtype == m.dtype == c.dtype == torch.int64
    hier = t["groups"] % t["nodes"] == 0
    eplb_opt.verify(p, t["E"], t["R"], t["G"], num_groups=t["groups"], num_nodes=t["nodes"],
                    hierarchical=hier, log2phy=m, logcnt=c)


@share(0.5)
@given(problems(), st.data())
def test_vllm_policy(args, data):
    from eplb_opt.integrations.vllm import EplbOptPolicy

    t, raw, seen, _ = args
    weight = torch.as_tensor(seen)
    old = None
    how = data.draw(st.sampled_from(["none", "same-shape", "with-empty-slots", "other-shape"]))
    if how != "none":
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        prior = eplb_opt.solve(make_loads("pareto", (t["L"], t["E"]), rng), **kwargs(t)).plan.phy2log.clone()
        if how == "with-empty-slots":
            prior[:, -1] = -1
        if how == "other-shape":
            prior = prior[:, :-1]
        old = prior
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # the other-shape warning
        p = EplbOptPolicy.rebalance_experts(weight, t["R"], t["groups"], t["nodes"], t["G"],
                                            old_global_expert_indices=old)
    hier = t["groups"] % t["nodes"] == 0
    assert plan_violations(p, t["E"], t["R"], t["G"], num_groups=t["groups"], num_nodes=t["nodes"],
                           hierarchical=hier) == []
    # Relabelling to the old map never changes how balanced the plan is.
    ref = eplb_opt.solve(seen, **kwargs(t))
    assert np.allclose(eplb_opt.gpu_loads(seen, p.numpy(), t["G"]).max(axis=1), ref.max_load, rtol=1e-12)


@share(0.5)
@given(problems(windows=True), st.data())
def test_sglang_rebalance(args, data):
    from eplb_opt.integrations.sglang import rebalance_experts

    t, raw, seen, _ = args
    tokens = torch.as_tensor(seen)                    # [steps, L, E]
    k = t["R"] // t["G"]
    hier = t["groups"] % t["nodes"] == 0 and data.draw(st.booleans())
    active = None
    if data.draw(st.booleans()):
        most = t["G"] - -(-t["E"] // k)
        if most >= 1:
            active = torch.ones(t["G"], dtype=torch.bool)
            active[data.draw(st.integers(0, t["G"] - 1))] = False
    p2l, l2p, cnt = rebalance_experts(tokens, t["R"], k, t["groups"], t["nodes"], enable_hierarchical=hier,
                                      active_ranks=active)
    masked = None if active is None else np.broadcast_to(~active.numpy(), (t["L"], t["G"]))
    assert plan_violations(p2l, t["E"], t["R"], t["G"], num_groups=t["groups"], num_nodes=t["nodes"],
                           hierarchical=hier and active is None, masked=masked) == []
    assert cnt.shape == (t["L"], t["E"]) and l2p.shape[:2] == (t["L"], t["E"])


# -- the CLI ----------------------------------------------------------------------------

@share(0.2)
@given(problems(max_layers=3), st.sampled_from([".json", ".npz", ".pt"]), st.sampled_from([".npy", ".json", ".pt"]),
       st.sampled_from(["heuristic", "exact"]))
def test_cli_plan_then_evaluate(args, plan_suffix, loads_suffix, mode):
    from eplb_opt.cli import main

    t, raw, seen, _ = args
    with tempfile.TemporaryDirectory() as d:
        loads = Path(d) / f"loads{loads_suffix}"
        if loads_suffix == ".npy":
            np.save(loads, seen[None])
        elif loads_suffix == ".pt":
            torch.save(torch.from_numpy(seen[None].copy()), loads)
        else:
            loads.write_text(json.dumps({"load_history": [{"logical_expert_load": seen.tolist()}]}))
        out = Path(d) / f"plan{plan_suffix}"
        argv = ["plan", str(loads), "--replicas", str(t["R"]), "--groups", str(t["groups"]), "--nodes",
                str(t["nodes"]), "--gpus", str(t["G"]), "--mode", mode, "--time-limit", "0.1", "-o", str(out),
                "--json"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0
        report = json.loads(buf.getvalue())
        plan = eplb_opt.Plan.load(out)
        hier = report["policy"] == "hierarchical"
        assert plan_violations(plan.phy2log, t["E"], t["R"], t["G"], num_groups=t["groups"], num_nodes=t["nodes"],
                               hierarchical=hier) == []
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main(["evaluate", str(out), str(loads), "--json"]) == 0
        # Nothing but the two files: no temporary file left behind.
        assert sorted(p.name for p in Path(d).iterdir()) == sorted([loads.name, out.name])


# -- garbage in --------------------------------------------------------------------------

junk_scalars = st.one_of(
    st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
    st.text(max_size=3), st.just(2**70), st.just(np.int64(8)), st.just(np.float64(8.0)),
)
junk_arrays = st.one_of(
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=6), max_size=4),
    st.lists(st.lists(st.integers(-2**70, 2**70), max_size=6), max_size=3),
    st.lists(st.one_of(st.integers(), st.text(max_size=2), st.none()), max_size=5),
    st.builds(lambda s, k: np.zeros(s, dtype=k), st.lists(st.integers(0, 3), max_size=4).map(tuple),
              st.sampled_from([np.float64, np.int8, np.bool_, np.complex64, np.uint64, np.float16])),
    junk_scalars,
)


@share(1.0)
@given(junk_arrays, junk_scalars, junk_scalars, junk_scalars, junk_scalars,
       st.sampled_from(["heuristic", "exact", "fast", None, 3]),
       st.one_of(st.none(), st.floats(-1, 0.2), st.text(max_size=2)),
       st.sampled_from(["auto", "global", "hierarchical", "spill", "best", None]))
def test_garbage_arguments_raise_our_errors_only(weight, R, groups, nodes, G, mode, limit, policy):
    try:
        r = eplb_opt.solve(weight, num_replicas=R, num_groups=groups, num_nodes=nodes, num_gpus=G, mode=mode,
                           time_limit=limit, policy=policy)
    except EplbOptError as exc:
        assert isinstance(exc, (ValueError, TypeError))
        assert str(exc)
        return
    # Accepted: then it must be a valid problem and a valid plan.
    w = np.asarray(r.plan.metadata and weight, dtype=np.float64)
    t = dict(L=w.shape[0], E=w.shape[1], R=int(R), groups=int(groups), nodes=int(nodes), G=int(G))
    check_result(r, t, w)


@share(0.5)
@given(st.binary(max_size=600), st.sampled_from([".npy", ".npz", ".pt", ".json", ".safetensors"]))
def test_random_bytes_as_a_trace_or_plan_file(blob, suffix):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"x{suffix}"
        f.write_bytes(blob)
        try:
            arr = eplb_opt.read_trace(f)
        except eplb_opt.TraceError:
            pass
        else:
            assert arr.ndim == 3 and np.isfinite(arr).all() and (arr >= 0).all()
        if suffix in (".npy", ".safetensors"):
            return
        try:
            eplb_opt.Plan.load(f)
        except eplb_opt.PlanFileError:
            pass


@share(0.5)
@given(st.sampled_from([".npy", ".npz", ".pt", ".json"]), st.data())
def test_corrupted_good_files_fail_cleanly(suffix, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    steps = rng.integers(0, 50, size=(2, 2, 8)).astype(np.float64)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"t{suffix}"
        if suffix == ".npy":
            np.save(f, steps)
        elif suffix == ".npz":
            np.savez_compressed(f, loads=steps)
        elif suffix == ".pt":
            torch.save(torch.from_numpy(steps), f)
        else:
            f.write_text(json.dumps({"load_history": [{"logical_expert_load": s.tolist()} for s in steps]}))
        raw = bytearray(f.read_bytes())
        how = data.draw(st.sampled_from(["truncate", "flip", "both"]))
        if how in ("flip", "both"):
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        if how in ("truncate", "both"):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        f.write_bytes(bytes(raw))
        try:
            arr = eplb_opt.read_trace(f)
        except eplb_opt.TraceError:
            return
        assert arr.ndim == 3 and np.isfinite(arr).all() and (arr >= 0).all()


@pytest.mark.parametrize("n", [1])
def test_profiles_are_registered(n):
    assert settings.get_profile("ci").max_examples > 0 and settings.get_profile("long").max_examples >= 1000
