"""eplb_opt.replay and `eplb-opt replay`: what plans do to serving over time (issue 16)."""

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import eplb_opt
from eplb_opt.errors import EplbOptError, InvalidProblemError, InvalidTypeError
from eplb_opt.replay import PlanRequest, ReplayPolicy, Topology, step_trace
from eplb_opt.replay._engine import copy_split
from eplb_opt.traces import TraceError
from eplb_opt.workloads import Preset

# 4 layers x 16 experts, 24 replicas on 4 GPUs (6 slots each) in 2 nodes, 4 groups:
# hierarchical; the global topology puts the same GPUs on one node.
TINY = Preset("tiny", 4, 16, 24, 4, 2, 4, top_k=2, tokens=64)
HIER = dict(num_replicas=24, num_groups=4, num_nodes=2, num_gpus=4)
GLOBAL = dict(num_replicas=24, num_groups=1, num_nodes=1, num_gpus=4)


@pytest.fixture(scope="module")
def trace():
    return step_trace(TINY, 240, seed=3, drift=0.6, drift_steps=40)


class Recorder:
    """A policy that plans with eplb-opt's heuristic and keeps what it was given and gave."""

    def __init__(self, name="rec"):
        self.calls = []
        self.policy = ReplayPolicy(name, self.plan, uses_deployed=True)

    def plan(self, req: PlanRequest):
        out = eplb_opt.solve(req.history.summed(), **req.topology.solve_kwargs()).plan.phy2log.numpy()
        self.calls.append((req.step, req.history.start, req.history.stop, req.deployed.copy(), out))
        return out


def _replay(trace, topo=HIER, **kw):
    kw.setdefault("policies", ["ours"])
    kw.setdefault("interval", 40)
    return eplb_opt.replay(trace, **topo, **kw)


def test_static_moves_nothing_and_policies_rebalance_on_schedule(trace):
    r = _replay(trace, interval=[40, 100])
    for iv in (40, 100):
        static = r.run("static", iv)
        assert len(static.rebalance_steps) == 0 and static.moves.sum() == 0
        assert r.totals("static", iv)["bytes_moved"] == 0
        ours = r.run("ours", iv)
        assert ours.rebalance_steps.tolist() == list(range(iv, 240, iv))
        assert r.window_edges[iv].tolist() == list(range(0, 240, iv)) + [240]
    # Static serves the same placement whatever the interval.
    assert np.array_equal(r.run("static", 40).max_load, r.run("static", 100).max_load)


@pytest.mark.parametrize("topo", [HIER, GLOBAL], ids=["hierarchical", "global"])
def test_certified_bound_is_below_every_runs_window_load(trace, topo):
    r = _replay(trace, topo, policies=["ours", "migrate", "windows"], interval=[30, 80], initial="round_robin")
    for run in r.runs:
        assert run.obeys_policy
        lb = r.lower_bound[run.interval]
        assert (lb <= run.window_max_load * (1 + 1e-12)).all(), run.policy
        assert (r.global_lower_bound[run.interval] <= lb * (1 + 1e-12)).all()
        edges = r.window_edges[run.interval]
        per_window = np.add.reduceat(run.max_load, edges[:-1])
        # A step's busiest GPU carries at least its share of the window's busiest GPU.
        assert (run.window_max_load <= per_window * (1 + 1e-12)).all(), run.policy
    # The round-robin start is far from balanced: the bound is not trivially met.
    assert r.totals("static", 30)["window_load_total"] > 1.2 * r.totals("static", 30)["lower_bound_total"]


def test_loads_are_the_gpu_loads_of_the_plan_each_step_was_served_by(trace):
    rec = Recorder()
    r = _replay(trace, policies=[rec.policy], interval=60, clairvoyant=False)
    run = r.run("rec", 60)
    served = [r_plan for *_, r_plan in rec.calls]      # its own first plan (initial="plan"), then each rebalance
    steps = np.asarray(trace, dtype=np.float64)
    for i, plan in enumerate(served):
        for t in range(i * 60, min(240, (i + 1) * 60)):
            want = eplb_opt.gpu_loads(steps[t], plan, 4).max(axis=1).sum()
            assert run.max_load[t] == pytest.approx(want, rel=1e-13)
    assert r.mean_load[7] == pytest.approx(steps[7].sum() / 4, rel=1e-13)
    # The plan at step s saw steps s - window .. s - 1 (window = interval by default); the
    # first plan, serving from step 0, the first window.
    assert [(s, a, b) for s, a, b, *_ in rec.calls] == [(0, 0, 60), (60, 0, 60), (120, 60, 120), (180, 120, 180)]


def test_moves_are_counted_after_alignment(trace):
    rec = Recorder()
    r = _replay(trace, policies=[rec.policy], interval=60, clairvoyant=False)
    run = r.run("rec", 60)
    assert len(rec.calls) == 1 + len(run.moves)
    for (step, _, _, deployed, plan), moves in zip(rec.calls[1:], run.moves):
        aligned = eplb_opt.align_to_previous(plan, deployed, 4, 2)
        assert moves == eplb_opt.count_moves(deployed, aligned, 4).sum()
        assert moves < eplb_opt.count_moves(deployed, plan, 4).sum() or moves == 0
    assert (run.same_node_moves + run.cross_node_moves == run.moves).all()
    t = r.totals("rec", 60)
    assert t["bytes_moved"] == t["moves"] * eplb_opt.replay.DEFAULT_BYTES_PER_EXPERT > 0


def _relabelled(req: PlanRequest) -> np.ndarray:
    """The deployed placement with GPUs swapped (within and across nodes) and each GPU's
    slots reversed: the same placement under other labels."""
    d = req.deployed.reshape(req.deployed.shape[0], 4, 6)
    return d[:, [3, 2, 1, 0], ::-1].reshape(req.deployed.shape).copy()


def test_a_relabelled_copy_of_the_deployed_plan_moves_nothing(trace):
    r = _replay(trace, policies=[ReplayPolicy("relabel", _relabelled, uses_deployed=True), "ours"],
                interval=40, bytes_per_expert=1000, initial="round_robin")
    run = r.run("relabel", 40)
    assert len(run.rebalance_steps) == 5 and run.moves.sum() == 0 and run.copy_s.sum() == 0
    assert np.array_equal(run.max_load, r.run("static", 40).max_load)
    assert r.run("ours", 40).moves.sum() > 0           # the counter does count real moves


def test_same_and_cross_node_copies():
    topo = Topology(1, 4, 4, 2, 2, 4)                     # 4 GPUs, 1 slot each, nodes {0, 1} and {2, 3}
    old = np.array([[0, 1, 2, 3]])
    # Expert 1 onto GPU 0: it lived on node 0, same-node.  Expert 3 onto GPU 1 and expert 0
    # onto GPU 3: each lived on the other node only, cross-node.  GPU 2 keeps expert 2.
    same, cross = copy_split(old, np.array([[1, 3, 2, 0]]), topo)
    assert same.tolist() == [1, 0, 0, 0] and cross.tolist() == [0, 1, 0, 1]
    same, cross = copy_split(old, old, topo)
    assert same.sum() == cross.sum() == 0


def test_time_model_charges_copies_and_slower_links_cost_more(trace):
    kw = dict(policies=["ours"], interval=40, clairvoyant=False)
    fast = _replay(trace, link_gbps=(450.0, 50.0), **kw)
    slow = _replay(trace, link_gbps=(45.0, 5.0), **kw)
    off = _replay(trace, gpu_tokens_per_s=None, **kw)
    f, s = fast.totals("ours", 40), slow.totals("ours", 40)
    assert f["moves"] == s["moves"] > 0
    assert s["copy_s"] == pytest.approx(10 * f["copy_s"]) and f["copy_s"] > 0
    assert f["time_s"] == pytest.approx(f["compute_s"] + f["copy_s"])
    assert s["time_s"] > f["time_s"]
    assert f["compute_s"] == pytest.approx(f["load_total"] / eplb_opt.replay.DEFAULT_GPU_TOKENS_PER_S)
    assert fast.step_time_s("ours", 40).sum() == pytest.approx(f["time_s"])
    # The copy is charged from the rebalance step on.
    extra = slow.step_time_s("ours", 40) - slow.run("ours", 40).max_load / slow.time_model.gpu_tokens_per_s
    first = np.flatnonzero(extra)[0]
    assert first in slow.run("ours", 40).rebalance_steps and extra.sum() == pytest.approx(s["copy_s"])
    assert "time_s" not in off.totals("ours", 40) and off.time_model is None
    with pytest.raises(ValueError, match="without a time model"):
        off.step_time_s("ours", 40)
    # Bytes per expert scales the copy time too.
    half = _replay(trace, bytes_per_expert=eplb_opt.replay.DEFAULT_BYTES_PER_EXPERT // 2, **kw)
    assert half.totals("ours", 40)["copy_s"] == pytest.approx(f["copy_s"] / 2, rel=1e-6)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(interval=0), InvalidProblemError, "interval"),
    (dict(interval=240), InvalidProblemError, "interval 240"),
    (dict(interval=[40, 40]), InvalidProblemError, "twice"),
    (dict(interval=2.5), InvalidTypeError, "interval"),
    (dict(window=0), InvalidProblemError, "window"),
    (dict(policies=["ours", "nope"]), InvalidProblemError, "'nope'"),
    (dict(policies=[]), InvalidProblemError, "policies"),
    (dict(policies=["ours", "ours"]), InvalidProblemError, "more than once"),
    (dict(num_replicas=25), InvalidProblemError, "num_replicas=25"),
    (dict(num_replicas=8), InvalidProblemError, "num_replicas=8"),
    (dict(num_gpus=True), InvalidTypeError, "num_gpus"),
    (dict(gpu_tokens_per_s=-1.0), InvalidProblemError, "gpu_tokens_per_s"),
    (dict(link_gbps=(1.0,)), InvalidTypeError, "link_gbps"),
    (dict(link_gbps=(1.0, 0.0)), InvalidProblemError, "cross node"),
    (dict(bytes_per_expert=1.5), InvalidTypeError, "bytes_per_expert"),
    (dict(max_balance_loss=1.0), InvalidProblemError, "max_balance_loss"),
    (dict(windows_objective="max"), InvalidProblemError, "windows_objective"),
    (dict(initial="random"), InvalidProblemError, "initial"),
    (dict(clairvoyant="yes"), InvalidTypeError, "clairvoyant"),
    (dict(chunk_steps=0), InvalidProblemError, "chunk_steps"),
])
def test_bad_arguments_raise_named_errors(trace, kwargs, exc, words):
    args = {**HIER, "policies": ["ours"], "interval": 40, **kwargs}
    with pytest.raises(exc, match=words) as info:
        eplb_opt.replay(trace, **args)
    assert isinstance(info.value, EplbOptError)


def test_bad_traces_raise_named_errors(tmp_path, trace):
    with pytest.raises(InvalidProblemError, match=r"\[steps, layers, experts\].*one step"):
        eplb_opt.replay(trace[0], **HIER)
    with pytest.raises(InvalidTypeError, match="dtype"):
        eplb_opt.replay(trace.astype(complex), **HIER)
    with pytest.raises(TraceError, match="no such file"):
        eplb_opt.replay(tmp_path / "missing.npy", **HIER)
    bad = np.asarray(trace, dtype=np.float64).copy()
    bad[170, 1, 3] = -1.0
    with pytest.raises(TraceError, match="steps 160..199 hold negative"):
        eplb_opt.replay(bad, **HIER, policies=["ours"], interval=40, chunk_steps=40)
    (tmp_path / "t.npy").write_bytes(b"not numpy")
    with pytest.raises(TraceError, match="not a readable .npy"):
        eplb_opt.replay(tmp_path / "t.npy", **HIER)


def _same(a, b):
    assert [(r.policy, r.interval) for r in a.runs] == [(r.policy, r.interval) for r in b.runs]
    for x, y in zip(a.runs, b.runs):
        for f in ("max_load", "window_max_load", "moves", "same_node_moves", "cross_node_moves", "copy_s"):
            assert np.array_equal(getattr(x, f), getattr(y, f)), (x.policy, f)
    for iv in a.intervals:
        assert np.array_equal(a.lower_bound[iv], b.lower_bound[iv])
    assert np.array_equal(a.mean_load, b.mean_load)


def test_every_trace_format_gives_the_same_figures_as_the_array(tmp_path, trace):
    """.npy and .safetensors stream; .npz, .pt and ADRS .json load whole; all agree."""
    import torch
    from safetensors.numpy import save_file

    np.save(tmp_path / "t.npy", trace)
    save_file({"loads": np.ascontiguousarray(trace)}, str(tmp_path / "t.safetensors"))
    np.savez(tmp_path / "t.npz", loads=trace)
    torch.save(torch.as_tensor(trace), tmp_path / "t.pt")
    adrs = {"load_history": [{"logical_expert_load": step.tolist()} for step in trace]}
    (tmp_path / "t.json").write_text(json.dumps(adrs))
    kw = dict(policies=["ours", "windows"], interval=[40, 70], chunk_steps=32)
    whole = _replay(trace, **kw)
    for name, streams in (("t.npy", True), ("t.safetensors", True), ("t.npz", False), ("t.pt", False),
                          ("t.json", False)):
        r = _replay(tmp_path / name, **kw)
        assert r.streamed is streams, name
        _same(whole, r)
    # Another chunk size: sums in another order, figures equal to rounding.
    other = _replay(np.asarray(trace, dtype=np.float64), policies=["ours", "windows"], interval=[40, 70],
                    chunk_steps=7)
    for x, y in zip(whole.runs, other.runs):
        assert np.allclose(x.max_load, y.max_load, rtol=1e-12) and np.array_equal(x.moves, y.moves)


def test_a_long_memmapped_trace_is_read_in_chunks(tmp_path):
    """80,000 steps x 4 x 256 int32 (328 MB on disk, 655 MB as float64): the replay's
    allocations peak at a few chunks (CHUNK_BYTES of float64 each), far below the trace."""
    from eplb_opt.replay import CHUNK_BYTES

    T = 80_000
    path = tmp_path / "long.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(T, 4, 256))
    rng = np.random.default_rng(0)
    for a in range(0, T, 10_000):
        arr[a:a + 10_000] = rng.integers(0, 50, size=(10_000, 4, 256), dtype=np.int32)
    arr.flush()
    del arr
    # Imports and first-call set-up are not the trace's: pay them before measuring.
    eplb_opt.replay(np.ones((4, 4, 256)), num_replicas=256, num_gpus=8, policies=["ours"], interval=2)
    tracemalloc.start()
    try:
        r = eplb_opt.replay(path, num_replicas=256, num_gpus=8, policies=["ours"], interval=40_000,
                            clairvoyant=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.streamed and r.steps == T and r.run("ours", 40_000).max_load.shape == (T,)
    assert peak < 4 * CHUNK_BYTES < T * 4 * 256 * 8 / 4, f"peak {peak / 1e6:.0f} MB"


def test_a_failing_policy_is_reported_and_the_others_go_on(trace):
    def boom(req):
        if req.step > 40:
            raise RuntimeError("planner down")
        return req.deployed

    r = _replay(trace, policies=[ReplayPolicy("boom", boom), "ours"], interval=40)
    assert "planner down" in r.failed["boom@40"] and "step 80" in r.failed["boom@40"]
    assert ("boom", 40) not in [(x.policy, x.interval) for x in r.runs]
    assert r.run("ours", 40).moves.sum() > 0
    bad = _replay(trace, policies=[ReplayPolicy("short", lambda req: req.deployed[:, :5])], interval=40)
    assert "returned shape" in bad.failed["short@40"]


def test_plans_that_ignore_the_deployed_placement_are_reused_across_intervals(trace):
    rec = Recorder("stateless")
    stateless = ReplayPolicy("stateless", rec.plan, uses_deployed=False)
    _replay(trace, policies=[stateless], interval=[40, 80], window=40, clairvoyant=False)
    # The first plan (steps 0..39) serves again at step 40; interval 80 rebalances at 80 and
    # 160 with histories interval 40 saw: no new call.
    assert [c[0] for c in rec.calls] == [0, 80, 120, 160, 200]
    # A policy that reads the deployed placement replans at every rebalance; its first plan
    # (same history, same round-robin "deployed") is made once for both intervals.
    rec2 = Recorder("stateful")
    _replay(trace, policies=[rec2.policy], interval=[40, 80], window=40, clairvoyant=False)
    assert [c[0] for c in rec2.calls] == [0, 40, 80, 120, 160, 200, 80, 160]


def test_progress_only_when_asked(trace, capsys):
    _replay(trace, interval=40)
    assert capsys.readouterr().err == ""
    _replay(trace, interval=40, progress=True)
    assert "replay: done" in capsys.readouterr().err


def test_summary_and_json(trace):
    r = _replay(trace, policies=["ours", "windows"], interval=[40, 80])
    text = r.summary()
    assert "clairvoyant" in text and "least time at interval" in text
    data = json.loads(json.dumps(r.to_dict(points=50)))
    assert len(data["series_steps"]) == 51 and len(data["runs"]) == 8
    assert data["time_model"]["same_node_gbps"] == 450.0 and data["initial_placement"].startswith("plan")


def test_step_trace_is_the_same_in_memory_and_on_disk(tmp_path):
    a = step_trace(TINY, 300, seed=1)
    b = np.load(step_trace(TINY, 300, seed=1, out=tmp_path / "s.npy"))
    assert a.dtype == np.int32 and np.array_equal(a, b)
    assert not np.array_equal(a, step_trace(TINY, 300, seed=2))
    with pytest.raises(InvalidProblemError, match="preset"):
        step_trace("no-such-model", 10)


def _window_shares(t: np.ndarray, win: int) -> np.ndarray:
    """Each kind window's expert shares ``[windows, L, E]``."""
    w = t.reshape(-1, win, *t.shape[1:]).sum(axis=1).astype(np.float64)
    return w / np.maximum(w.sum(axis=2, keepdims=True), 1.0)


def test_step_trace_drift_kinds(tmp_path):
    """Each drift kind of eplb_opt.workloads.DRIFT_KINDS per step: its parameters are
    recorded, memory and disk agree, and the kinds differ as their docs say."""
    from eplb_opt.replay import KIND_WINDOW_STEPS, step_trace_parameters
    from eplb_opt.workloads import DRIFT_KINDS

    assert KIND_WINDOW_STEPS == 500
    big = Preset("big", 2, 32, 32, 1, 1, 4, top_k=2, tokens=4096)
    out = {}
    for kind in DRIFT_KINDS:
        a = step_trace(big, 2000, seed=4, drift_kind=kind, kind_window=100)
        assert a.dtype == np.int32 and a.shape == (2000, 2, 32)
        assert np.array_equal(a, np.load(step_trace(big, 2000, seed=4, drift_kind=kind, kind_window=100,
                                                    out=tmp_path / f"{kind}.npy")))
        prm = step_trace_parameters(big, 2000, seed=4, drift_kind=kind, kind_window=100)
        assert prm["drift_kind"] == kind and prm["kind_window"] == 100
        assert all(prm[k] == v for k, v in DRIFT_KINDS[kind].items())
        sh = _window_shares(a, 100)
        out[kind] = np.abs(np.diff(sh, axis=0)).sum(axis=2).mean(axis=1) / 2       # change per window
    assert out["steady"].max() < 0.03                                # sampling noise only
    assert out["walk"].min() > out["steady"].max()                   # moves every window
    assert (out["switch"] < 0.03).any() and out["switch"].max() > 0.08       # still, then a jump
    assert out["periodic"][3] < out["periodic"][1]                   # slow at the cycle's top
    # Different kinds from the same seed are different traces; the default is unchanged.
    assert not np.array_equal(step_trace(big, 300, seed=4, drift_kind="walk"),
                              step_trace(big, 300, seed=4, drift_kind="burst"))
    assert "drift_kind" not in step_trace_parameters(big, 300, seed=4)
    with pytest.raises(InvalidProblemError, match="drift_kind must be one of"):
        step_trace(big, 10, drift_kind="sideways")
    with pytest.raises(InvalidProblemError, match="leave drift, mix_shift unset"):
        step_trace(big, 10, drift_kind="walk", drift=0.2, mix_shift=0.1)
    with pytest.raises(InvalidProblemError, match="kind_window=50 needs a drift_kind"):
        step_trace(big, 10, kind_window=50)


def test_replay_is_callable_however_the_package_was_imported():
    code = ("import sys, eplb_opt.replay, eplb_opt; assert callable(eplb_opt.replay); "
            "from eplb_opt.replay import ReplayPolicy; assert 'torch' not in sys.modules; "
            "import eplb_opt as e; f = e.replay; assert callable(f)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    code2 = "import sys, eplb_opt; f = eplb_opt.replay; import eplb_opt.replay; assert callable(eplb_opt.replay); " \
            "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code2], check=True, timeout=60)


# -- peers, loaded from their wheels as `eplb-opt bench` loads them

def _peer_or_skip(name):
    from eplb_opt.bench import peers

    loader = {"deepseek": peers.deepseek_rebalance, "vllm": peers.vllm_default_rebalance,
              "sglang_vec": peers.deepseek_vec_rebalance}[name]
    try:
        loader()
    except Exception as exc:  # noqa: BLE001 - reported in the skip reason
        pytest.skip(f"{name} peer unavailable: {exc}")


@pytest.mark.parametrize("topo", [HIER, GLOBAL], ids=["hierarchical", "global"])
def test_peers_replay_beside_ours(trace, topo):
    for name in ("deepseek", "vllm", "sglang_vec"):
        _peer_or_skip(name)
    r = _replay(trace, topo, policies=["deepseek", "vllm", "sglang_vec", "ours"], interval=60)
    assert not r.skipped and not r.failed
    for name in ("deepseek", "vllm", "sglang_vec"):
        run = r.run(name, 60)
        assert run.obeys_policy and len(run.rebalance_steps) == 3
        assert (r.lower_bound[60] <= run.window_max_load * (1 + 1e-12)).all()


def test_sglang_vec_gets_the_step_axis(trace, monkeypatch):
    _peer_or_skip("sglang_vec")
    from eplb_opt.bench import peers

    real = peers.deepseek_vec_rebalance()
    seen = []

    def spy(w, *args):
        seen.append(tuple(w.shape))
        return real(w, *args)

    monkeypatch.setattr(peers, "deepseek_vec_rebalance", lambda: spy)
    _replay(trace, policies=["sglang_vec"], interval=60, window=50)
    assert seen == [(50, 4, 16)] * 4         # its first plan (steps 0..49), then steps s - 50 .. s - 1


def test_an_unavailable_peer_is_skipped_with_its_reason(trace, monkeypatch):
    from eplb_opt.bench import peers

    def unavailable():
        raise peers.PeerUnavailable("vllm==0.33.0 is not in the peer cache (no network?)")

    monkeypatch.setattr(peers, "vllm_default_rebalance", unavailable)
    r = _replay(trace, policies=["vllm", "ours"], interval=60)
    assert "not in the peer cache" in r.skipped["vllm"]
    assert "vllm: skipped" in r.summary()


# -- the command line

def test_cli_replay_writes_results_report_and_plots(tmp_path, capsys):
    from eplb_opt.cli import main

    out = tmp_path / "out"
    rc = main(["replay", "--preset", "deepseek-v2-lite", "--steps", "160", "--interval", "40,80",
               "--policies", "ours,windows", "--out", str(out), "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["intervals"] == [40, 80] and data["trace_parameters"]["preset"] == "deepseek-v2-lite"
    assert {r["policy"] for r in data["runs"]} == {"static", "clairvoyant", "ours", "windows"}
    assert "series_balancedness" not in data["runs"][0]
    for name in ("results.json", "REPORT.md", "balancedness.png", "moved_bytes.png", "interval_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "REPORT.md").read_text()
    assert "| 40 | ours |" in report and "![interval_sweep.png](interval_sweep.png)" in report


def test_cli_replay_of_a_trace_file_with_topology_flags(tmp_path, trace, capsys):
    from eplb_opt.cli import main

    np.save(tmp_path / "t.npy", trace)
    rc = main(["replay", str(tmp_path / "t.npy"), "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "4",
               "--interval", "60", "--policies", "ours", "--no-time-model", "--link-gbps", "1,1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "least load total at interval 60" in text and "time s" not in text


@pytest.mark.parametrize("argv, words", [
    (["--interval", "40,x"], "--interval must be comma-separated integers"),
    (["--link-gbps", "450"], "--link-gbps must be SAME,CROSS"),
    (["--policies", "ours,magic"], "unknown policy 'magic'"),
    (["--steps", "10"], "--steps applies to a generated trace"),
])
def test_cli_replay_bad_input_exits_2(tmp_path, trace, capsys, argv, words):
    from eplb_opt.cli import main

    np.save(tmp_path / "t.npy", trace)
    rc = main(["replay", str(tmp_path / "t.npy"), "--replicas", "24", "--gpus", "4", "--policies", "ours",
               "--interval", "40", *argv])
    assert rc == 2
    assert words in capsys.readouterr().err


def test_cli_replay_needs_a_trace_or_a_preset(capsys):
    from eplb_opt.cli import main

    assert main(["replay", "--replicas", "24", "--gpus", "4"]) == 2
    assert "--preset NAME" in capsys.readouterr().err


def test_forecast_policy_plans_from_sub_windows_as_history(trace):
    """``forecast``: solve(latest sub-window, history=the earlier ones), the default forecast."""
    from eplb_opt.problem import DEFAULT_FORECAST
    from eplb_opt.replay._policies import PlanRequest, PolicyOptions, Topology, load_policies

    r = _replay(trace, GLOBAL, policies=["forecast"], interval=60, sub_windows=3)
    run = r.run("forecast", 60)
    assert run.obeys_policy and len(run.rebalance_steps) == 3
    (pol,), _ = load_policies(["forecast"], PolicyOptions(0.0, 0.0, 3, "worst"))
    assert DEFAULT_FORECAST in pol.description

    class Stub:
        num_steps = 60

        def windows(self, n):
            return np.stack([trace[a:b].sum(axis=0) for a, b in ((0, 20), (20, 40), (40, 60))][:n])

    topo = Topology(4, 16, **GLOBAL)
    got = pol.plan(PlanRequest(60, Stub(), np.zeros((4, 24), dtype=np.int64), topo))
    h = Stub().windows(3)
    assert np.array_equal(got, np.asarray(eplb_opt.solve(h[-1], **GLOBAL, history=h[:-1]).plan.phy2log))
