"""Serving-engine integrations: vLLM 0.33's policy contract (checked against the real
``abstract.py`` and registry ``__init__.py`` from the ``vllm==0.33.0`` wheel, fetched once
into the peer cache), SGLang's shapes, and aligning a new plan to the deployed one."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, align_to_previous, count_moves
from eplb_opt.integrations import sglang as eplb_sglang
from eplb_opt.integrations import vllm as eplb_vllm
from eplb_opt.workloads import generate

ROOT = Path(__file__).resolve().parents[1]

# The real files from the wheel; everything above them in vLLM's package tree is a stub
# (vLLM's own package __init__ files import its whole runtime).
REAL = [
    "vllm/distributed/eplb/__init__.py",
    "vllm/distributed/eplb/policy/__init__.py",
    "vllm/distributed/eplb/policy/abstract.py",
    "vllm/distributed/eplb/policy/default.py",
]


@pytest.fixture(scope="module")
def vllm_tree(tmp_path_factory):
    try:
        from eplb_opt.bench.peers import VLLM, fetch_wheel

        wheel = fetch_wheel(VLLM)
    except Exception as exc:  # noqa: BLE001 - no network and no cached wheel
        pytest.skip(f"vllm==0.33.0 wheel unavailable: {exc}")
    root = tmp_path_factory.mktemp("vllm_site")
    with zipfile.ZipFile(wheel) as zf:
        for member in REAL:
            (root / member).parent.mkdir(parents=True, exist_ok=True)
            (root / member).write_bytes(zf.read(member))
        parallel = zf.read("vllm/config/parallel.py").decode()
    assert 'EPLBPolicyOption = Literal["default"]' in parallel   # what the stub reproduces
    for stub in ("vllm/__init__.py", "vllm/distributed/__init__.py", "vllm/config/__init__.py"):
        (root / stub).parent.mkdir(parents=True, exist_ok=True)
        (root / stub).write_text("")
    (root / "vllm/config/parallel.py").write_text(
        'from typing import Literal\nEPLBPolicyOption = Literal["default"]\n'
    )
    return root


def _run(tree: Path, code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_vllm_policy_conforms_to_the_real_abstract_base(vllm_tree):
    out = _run(vllm_tree, """
        import inspect
        import vllm.distributed.eplb.policy as registry
        from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy
        from eplb_opt.integrations import vllm as ev

        P = ev.EplbOptPolicy
        assert issubclass(P, AbstractEplbPolicy), P.__mro__
        assert not getattr(P, "__abstractmethods__", None), P.__abstractmethods__
        base = inspect.signature(AbstractEplbPolicy.rebalance_experts)
        ours = inspect.signature(P.rebalance_experts)
        assert list(base.parameters) == list(ours.parameters), (base, ours)
        assert all(base.parameters[n].default == ours.parameters[n].default for n in base.parameters)
        assert isinstance(inspect.getattr_static(P, "rebalance_experts"), classmethod)

        default = registry.EPLB_POLICIES["default"]
        assert default.__name__ == "DefaultEplbPolicy"
        got = ev.install(mode="heuristic", seed=1)
        assert registry.EPLB_POLICIES["default"] is got is P
        assert set(registry.EPLB_POLICIES) == {"default"}
        print("ok")
    """)
    assert out.strip() == "ok"


def test_vllm_registry_policy_moves_nothing_on_an_unchanged_load(vllm_tree):
    out = _run(vllm_tree, """
        import numpy as np, torch
        import vllm.distributed.eplb.policy as registry
        from eplb_opt.integrations import vllm as ev
        from eplb_opt import count_moves
        from eplb_opt.workloads import generate

        ev.install()
        policy = registry.EPLB_POLICIES["default"]
        w = torch.from_numpy(generate("deepseek-v3-prefill", seed=0, windows=1)[0][:6])
        for groups, nodes in ((8, 4), (1, 1)):
            first = policy.rebalance_experts(w, 288, groups, nodes, 32)
            assert first.dtype == torch.int64 and first.device.type == "cpu" and first.shape == (6, 288)
            # vLLM passes the deployed physical_to_logical_map as old_global_expert_indices.
            again = policy.rebalance_experts(w, 288, groups, nodes, 32, first.clone())
            assert count_moves(first.numpy(), again.numpy(), 32).sum() == 0
            assert torch.equal(again, first)          # every replica keeps its slot
        print("ok")
    """)
    assert out.strip() == "ok"


def test_vllm_policy_without_vllm_uses_the_local_contract():
    P = eplb_vllm.EplbOptPolicy
    assert P.rebalance_experts.__func__.__code__.co_varnames[:7] == (
        "cls", "weight", "num_replicas", "num_groups", "num_nodes", "num_ranks", "old_global_expert_indices")


def test_vllm_policy_aligns_to_a_relabelled_old_plan():
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=1, windows=1)[0][:4])
    P = eplb_vllm.EplbOptPolicy.configure(mode="heuristic")
    new = P.rebalance_experts(w, 288, 8, 4, 32).numpy()
    # The deployed placement: the same plan with nodes swapped, GPUs within nodes
    # permuted and slots shuffled -- every GPU's content is unchanged.
    rng = np.random.default_rng(0)
    g = new.reshape(4, 4, 8, 9, order="C")[:, ::-1][:, :, rng.permutation(8)]  # [L, node, gpu, slot]
    old = np.take_along_axis(g, rng.permuted(np.broadcast_to(np.arange(9), g.shape), axis=-1), axis=-1)
    old = old.reshape(4, 288)
    got = P.rebalance_experts(w, 288, 8, 4, 32, torch.from_numpy(old)).numpy()
    assert count_moves(old, got, 32).sum() == 0
    assert np.array_equal(got, old)
    # A naive diff of the raw plan would have moved most replicas.
    assert count_moves(old, new, 32).sum() > 0


def test_vllm_policy_warns_when_the_slot_count_changed():
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=1, windows=1)[0][:2])
    old = eplb_vllm.EplbOptPolicy.rebalance_experts(w, 256, 8, 4, 32)
    with pytest.warns(RuntimeWarning, match="number of slots changed"):
        new = eplb_vllm.EplbOptPolicy.rebalance_experts(w, 288, 8, 4, 32, old)
    assert new.shape == (2, 288)


def test_vllm_policy_treats_minus_one_as_an_empty_slot():
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=2, windows=1)[0][:2])
    first = eplb_vllm.EplbOptPolicy.rebalance_experts(w, 288, 8, 4, 32)
    old = first.clone()
    old[:, :9] = -1                                   # one GPU's slots empty
    again = eplb_vllm.EplbOptPolicy.rebalance_experts(w, 288, 8, 4, 32, old).numpy()
    assert count_moves(first.numpy(), again, 32).sum() == 0


def test_vllm_settings_from_environment_and_configure(monkeypatch):
    monkeypatch.setenv("EPLB_OPT_MODE", "exact")
    monkeypatch.setenv("EPLB_OPT_TIME_LIMIT", "0.5")
    monkeypatch.setenv("EPLB_OPT_DETERMINISTIC", "1")
    s = eplb_vllm.settings()
    assert s["mode"] == "exact" and s["time_limit"] == 0.5 and s["deterministic"] is True
    assert eplb_vllm.settings({"mode": "heuristic"})["mode"] == "heuristic"   # explicit wins
    with pytest.raises(InvalidProblemError, match="unknown setting 'budget'"):
        eplb_vllm.EplbOptPolicy.configure(budget=3)
    monkeypatch.setenv("EPLB_OPT_TIME_LIMIT", "soon")
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_TIME_LIMIT='soon'"):
        eplb_vllm.settings()


def test_vllm_install_without_vllm_raises_import_error():
    if "vllm" in sys.modules or any(Path(p, "vllm").exists() for p in sys.path if p):
        pytest.skip("vLLM importable here")
    with pytest.raises(ImportError):
        eplb_vllm.install()


def test_sglang_shapes_and_step_axis():
    steps = torch.from_numpy(generate("deepseek-v3-prefill", seed=3, windows=3)[:, :5])    # [3, 5, 256]
    p2l, l2p, cnt = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, history_windows=0)
    assert p2l.shape == (5, 288) and l2p.shape == (5, 256, 288 - 256 + 1) and cnt.shape == (5, 256)
    assert p2l.dtype == l2p.dtype == cnt.dtype == torch.int64
    # history_windows=0: the same as planning the summed loads directly.
    ref = eplb_opt.solve(steps.sum(dim=0), num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    assert torch.equal(p2l, ref.plan.phy2log)
    # Maps agree with each other.
    for l in range(5):
        for e in range(256):
            slots = l2p[l, e][l2p[l, e] >= 0]
            assert slots.numel() == cnt[l, e] and bool((p2l[l, slots] == e).all())


def test_sglang_algorithm_choice():
    class Algo:  # stands in for SGLang's EplbAlgorithm enum members
        def __init__(self, name):
            self.name = name

    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=3, windows=1)[0][:2])
    hier = eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, Algo("deepseek_hierarchical"))[0]
    glob = eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, Algo("deepseek"))[0]
    assert torch.equal(hier, eplb_opt.solve(w, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32,
                                            policy="hierarchical").plan.phy2log)
    assert torch.equal(glob, eplb_opt.solve(w, num_replicas=288, num_gpus=32, policy="global").plan.phy2log)
    with pytest.raises(InvalidProblemError, match="num_local_physical_experts=7"):
        eplb_sglang.rebalance_experts(w, 288, 7, 8, 4)
    with pytest.raises(InvalidTypeError, match="num_local_physical_experts"):
        eplb_sglang.rebalance_experts(w, 288, 9.0, 8, 4)


def test_align_keeps_loads_and_reduces_moves():
    w = generate("deepseek-v3-prefill", seed=4, windows=2)
    old = eplb_opt.solve(w[0], num_replicas=288, num_gpus=32, policy="global").plan.phy2log.numpy()
    new = eplb_opt.solve(w[1], num_replicas=288, num_gpus=32, policy="global").plan.phy2log.numpy()
    aligned = align_to_previous(new, old, 32)
    a = eplb_opt.gpu_loads(w[1], new, 32)
    b = eplb_opt.gpu_loads(w[1], aligned, 32)
    assert np.allclose(np.sort(a, axis=1), np.sort(b, axis=1))      # same GPU contents, relabelled
    assert count_moves(old, aligned, 32).sum() < count_moves(old, new, 32).sum()
    assert not eplb_opt.plan_violations(aligned, 256, 288, 32)


@pytest.mark.parametrize("args, err, match", [
    ((np.zeros((2, 8), dtype=np.int64), np.zeros((2, 6), dtype=np.int64), 2), InvalidProblemError, "differ in shape"),
    ((np.zeros((2, 8)), np.zeros((2, 8)), 2), InvalidTypeError, "new must be an integer"),
    ((np.zeros((2, 8), dtype=np.int64), np.zeros((2, 8), dtype=np.int64), 3), InvalidProblemError, "num_gpus=3"),
    ((np.zeros((2, 8), dtype=np.int64), np.zeros((2, 8), dtype=np.int64), 0), InvalidProblemError, "num_gpus"),
    ((np.zeros((2, 8), dtype=np.int64), -np.ones((2, 8), dtype=np.int64), 2), InvalidProblemError, "negative"),
])
def test_align_validates(args, err, match):
    with pytest.raises(err, match=match):
        align_to_previous(*args)


def test_vllm_migration_aware_setting_moves_less():
    w = generate("deepseek-v3-prefill", seed=5, windows=2)[:, :6]
    P = eplb_vllm.EplbOptPolicy
    try:
        P.configure(mode="heuristic")
        old = P.rebalance_experts(torch.from_numpy(w[0]), 288, 8, 4, 32)
        aligned = P.rebalance_experts(torch.from_numpy(w[1]), 288, 8, 4, 32, old).numpy()
        P.configure(mode="heuristic", max_balance_loss=0.005)
        mig = P.rebalance_experts(torch.from_numpy(w[1]), 288, 8, 4, 32, old).numpy()
    finally:
        P.configure()
    assert count_moves(old.numpy(), mig, 32).sum() < count_moves(old.numpy(), aligned, 32).sum()
    fresh = eplb_opt.gpu_loads(w[1], aligned, 32).max(axis=1)
    assert (eplb_opt.gpu_loads(w[1], mig, 32).max(axis=1) <= fresh * 1.005 * (1 + 1e-9)).all()


def test_sglang_beyond_balance_options():
    steps = torch.from_numpy(generate("deepseek-v3-prefill", seed=6, windows=3, mix_shift=0.5, mix_period=1)[:, :4])
    worst = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, objective="worst")[0].numpy()
    total = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4)[0].numpy()
    per = lambda p: np.stack([eplb_opt.gpu_loads(x, p, 32) for x in steps.numpy()]).max(axis=2).max(axis=0)
    assert (per(worst) <= per(total) * (1 + 1e-12)).all()
    active = np.ones(32, dtype=bool)
    active[0] = False
    p, l2p, cnt = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, active_ranks=active)
    assert (p[:, :9] == -1).all() and int(cnt.sum()) == 4 * 279
    assert not np.isin(l2p.numpy(), np.arange(9)).any()
    moved = eplb_sglang.rebalance_experts(steps[:2], 288, 9, 8, 4, previous=total, max_balance_loss=0.005)[0]
    assert count_moves(total, moved.numpy(), 32).sum() < 288 * 4


# -- same plan on every rank (issue 13): deterministic by default, exact mode refused without it

@pytest.fixture
def solve_calls(monkeypatch):
    """Records the keyword arguments of every eplb_opt.solve call the integrations make."""
    import eplb_opt.api

    calls, real = [], eplb_opt.api.solve
    monkeypatch.setattr(eplb_opt.api, "solve", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    for var in [v for v in os.environ if v.startswith("EPLB_OPT_")]:
        monkeypatch.delenv(var)
    yield calls
    eplb_vllm.EplbOptPolicy._config = {}          # not configure(): the environment may be bad here


def test_vllm_defaults_to_deterministic_and_passes_workers(solve_calls, monkeypatch):
    assert eplb_vllm.settings()["deterministic"] is True
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=7, windows=1)[0][:2])
    eplb_vllm.EplbOptPolicy.configure(mode="exact", time_limit=0.1).rebalance_experts(w, 288, 8, 4, 32)
    monkeypatch.setenv("EPLB_OPT_WORKERS", "2")
    eplb_vllm.EplbOptPolicy.configure().rebalance_experts(w, 288, 8, 4, 32)
    assert [(c["mode"], c["time_limit"], c["deterministic"], c["workers"]) for c in solve_calls] == [
        ("exact", 0.1, True, None), ("heuristic", None, True, 2)]


def test_vllm_refuses_exact_mode_without_determinism(solve_calls, monkeypatch):
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=7, windows=1)[0][:2])
    with pytest.raises(InvalidProblemError, match=r"deterministic=False with mode='exact' would give each rank a "
                                                  r"different plan \(set here by deterministic=False and mode='exact'\)"):
        eplb_vllm.EplbOptPolicy.configure(mode="exact", deterministic=False)
    monkeypatch.setenv("EPLB_OPT_MODE", "exact")
    monkeypatch.setenv("EPLB_OPT_DETERMINISTIC", "0")
    with pytest.raises(InvalidProblemError, match=r"set here by EPLB_OPT_DETERMINISTIC=0 and EPLB_OPT_MODE=exact\): "
                                                  r"vLLM runs the EPLB algorithm on every EP rank"):
        eplb_vllm.settings()
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_DETERMINISTIC=0"):
        eplb_vllm.EplbOptPolicy.rebalance_experts(w, 288, 8, 4, 32)     # the environment changed later
    assert solve_calls == []                                            # never silently changed
    # Heuristic mode is deterministic anyway: deterministic=False is accepted and passed on.
    eplb_vllm.EplbOptPolicy.configure(mode="heuristic").rebalance_experts(w, 288, 8, 4, 32)
    assert solve_calls[-1]["deterministic"] is False and solve_calls[-1]["mode"] == "heuristic"
    monkeypatch.setenv("EPLB_OPT_DETERMINISTIC", "perhaps")
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_DETERMINISTIC='perhaps' is not a valid deterministic"):
        eplb_vllm.settings()


def test_sglang_defaults_to_deterministic_and_passes_workers(solve_calls):
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=7, windows=1)[0][:2])
    eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, mode="exact", time_limit=0.1)
    eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, workers=2)
    assert [(c["mode"], c["deterministic"], c["workers"]) for c in solve_calls] == [
        ("exact", True, None), ("heuristic", True, 2)]
    assert eplb_sglang.settings()["deterministic"] is True


def test_sglang_refuses_exact_mode_without_determinism(solve_calls, monkeypatch):
    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=7, windows=1)[0][:2])
    with pytest.raises(InvalidProblemError, match=r"deterministic=False with mode='exact' would give each rank a "
                                                  r"different plan .*SGLang runs the EPLB algorithm"):
        eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, mode="exact", deterministic=False)
    eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, deterministic=False)          # heuristic: fine
    assert [c["deterministic"] for c in solve_calls] == [False]
    # The plugin's dispatch reads EPLB_OPT_*.
    monkeypatch.setenv("EPLB_OPT_MODE", "exact")
    monkeypatch.setenv("EPLB_OPT_DETERMINISTIC", "false")
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_DETERMINISTIC=false and EPLB_OPT_MODE=exact"):
        eplb_sglang.dispatch(w[None], 288, 9, 8, 4, None)
    monkeypatch.setenv("EPLB_OPT_DETERMINISTIC", "1")
    monkeypatch.setenv("EPLB_OPT_TIME_LIMIT", "0.1")
    monkeypatch.setenv("EPLB_OPT_POLICY", "global")
    eplb_sglang.dispatch(w[None], 288, 9, 8, 4, None)
    assert [(c["mode"], c["time_limit"], c["deterministic"], c["policy"]) for c in solve_calls[1:]] == [
        ("exact", 0.1, True, "global")]


def _sglang_buffer() -> torch.Tensor:
    """A recorder buffer ``[10, 4, 256]`` whose steps drift (a mix switch mid-way)."""
    return torch.from_numpy(generate("deepseek-v3-prefill", seed=11, windows=10, mix_shift=0.6)[:, :4].astype(np.float32))


def test_sglang_step_axis_is_history_by_default():
    steps = _sglang_buffer()
    got = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4)[0]
    # 4 sub-windows of 10 steps: edges 0, 2, 5, 7, 10; the latest is weight, the rest history.
    a = steps.numpy().astype(np.float64)
    wins = np.stack([a[lo:hi].sum(axis=0) for lo, hi in ((0, 2), (2, 5), (5, 7), (7, 10))])
    ref = eplb_opt.solve(wins[-1], history=wins[:-1], num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    assert torch.equal(got, ref.plan.phy2log)
    summed = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, history_windows=0)[0]
    assert not torch.equal(got, summed)
    assert torch.equal(eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, history_windows=1)[0], summed)
    # Fewer steps than sub-windows: one per step; one step: no history.
    two = eplb_sglang.rebalance_experts(steps[:2], 288, 9, 8, 4)[0]
    ref2 = eplb_opt.solve(a[1], history=a[:1], num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    assert torch.equal(two, ref2.plan.phy2log)
    one = eplb_sglang.rebalance_experts(steps[:1], 288, 9, 8, 4)[0]
    assert torch.equal(one, eplb_sglang.rebalance_experts(steps[:1], 288, 9, 8, 4, history_windows=0)[0])
    # Where history does not apply, plans are as before: previous, objective, 2-D loads.
    prev = summed.numpy()
    moved = eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, previous=prev, max_balance_loss=0.005)[0]
    assert torch.equal(moved, eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, previous=prev, max_balance_loss=0.005,
                                                            history_windows=0)[0])
    with pytest.raises(InvalidProblemError, match="history_windows must be an integer >= 0, got -1"):
        eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, history_windows=-1)


def test_sglang_history_setting_from_the_environment(monkeypatch):
    steps = _sglang_buffer()
    assert eplb_sglang.settings()["history_windows"] == 4
    default = eplb_sglang.dispatch(steps, 288, 9, 8, 4, None)[0]
    assert torch.equal(default, eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4)[0])
    monkeypatch.setenv("EPLB_OPT_HISTORY_WINDOWS", "0")
    assert eplb_sglang.settings()["history_windows"] == 0
    off = eplb_sglang.dispatch(steps, 288, 9, 8, 4, None)[0]
    assert torch.equal(off, eplb_sglang.rebalance_experts(steps, 288, 9, 8, 4, history_windows=0)[0])
    assert eplb_sglang.settings({"history_windows": 3})["history_windows"] == 3      # explicit over the environment
    monkeypatch.setenv("EPLB_OPT_HISTORY_WINDOWS", "many")
    with pytest.raises(InvalidProblemError, match="EPLB_OPT_HISTORY_WINDOWS='many' is not a valid history_windows"):
        eplb_sglang.settings()


_RANK = """
import sys, hashlib, numpy as np, torch
from eplb_opt.integrations import sglang
buf = torch.from_numpy(np.load(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
out = sglang.dispatch(buf, 288, 9, 8, 4, None)
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in out)).hexdigest())
"""


def test_sglang_history_plans_are_byte_identical_across_ranks(tmp_path):
    """Two "ranks" (separate processes, other thread counts) given the same buffer plan
    byte-identical maps: the history comes from the buffer only."""
    buf = tmp_path / "buffer.npy"
    np.save(buf, _sglang_buffer().numpy())
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLB_OPT_")}
    digests = [subprocess.run([sys.executable, "-c", _RANK, str(buf), str(threads)], env=env, check=True,
                              capture_output=True, text=True).stdout.strip() for threads in (1, 2)]
    mine = eplb_sglang.dispatch(torch.from_numpy(np.load(buf)), 288, 9, 8, 4, None)
    import hashlib

    assert digests[0] == digests[1] == hashlib.sha256(b"".join(t.numpy().tobytes() for t in mine)).hexdigest()
