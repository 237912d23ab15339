"""Bad input everywhere: malformed and truncated load files of every kind, files of the
wrong kind handed to the CLI, wrong dtypes, mismatched ``previous`` plans, and integer
loads beyond 2**53.  Each gets a clear error of our own (naming the file or argument),
a non-zero exit code from the CLI, and nothing half-written."""

import json
import warnings

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, Plan, TraceError
from eplb_opt.cli import main
from eplb_opt.errors import EplbOptError
from eplb_opt.planfile import PlanFileError

from .oracle import assert_consistent_certificate


@pytest.fixture
def files(tmp_path):
    """Good files of every trace kind plus a plan, and a folder to write into."""
    rng = np.random.default_rng(0)
    steps = rng.integers(0, 100, size=(3, 2, 16)).astype(np.float64)
    np.save(tmp_path / "loads.npy", steps)
    np.savez(tmp_path / "loads.npz", loads=steps)
    torch.save(torch.from_numpy(steps), tmp_path / "loads.pt")
    (tmp_path / "loads.json").write_text(json.dumps(
        {"load_history": [{"logical_expert_load": s.tolist()} for s in steps]}))
    from safetensors.numpy import save_file

    save_file({"loads": steps}, str(tmp_path / "loads.safetensors"))
    r = eplb_opt.solve(steps.sum(axis=0), num_replicas=32, num_gpus=8)
    for suffix in (".json", ".pt", ".npz"):
        r.plan.save(tmp_path / f"plan{suffix}")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, out


KINDS = ["npy", "npz", "pt", "json", "safetensors"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", [0, 1, 0.5, -1])
def test_truncated_trace_files_are_trace_errors(files, kind, cut):
    src, _ = files
    raw = (src / f"loads.{kind}").read_bytes()
    n = cut if isinstance(cut, int) and cut >= 0 else (len(raw) // 2 if cut == 0.5 else len(raw) - 3)
    bad = src / f"bad.{kind}"
    bad.write_bytes(raw[:n])
    with pytest.raises(TraceError, match="bad"):
        eplb_opt.read_trace(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_trace_files_are_trace_errors(files, kind):
    src, _ = files
    bad = src / f"garbage.{kind}"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TraceError, match="garbage"):
        eplb_opt.read_trace(bad)


@pytest.mark.parametrize("arr, match", [
    (np.ones((1, 2, 4), dtype=bool), "numeric"),
    (np.ones((1, 2, 4), dtype=complex), "numeric"),
    (np.array([[["a"] * 4] * 2]), "numeric"),
    (np.ones((1, 2, 0)), "shape"),
    (np.ones((2, 3, 4, 5)), "shape"),
    (np.full((1, 2, 4), np.nan), "finite"),
    (-np.ones((1, 2, 4)), "non-negative"),
])
def test_wrong_dtypes_and_shapes_in_trace_files(tmp_path, arr, match):
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(TraceError, match=match):
        eplb_opt.read_trace(tmp_path / "x.npy")


@pytest.mark.parametrize("obj", [
    {"logical_count": "not a tensor"},
    {"records": [{"forward_pass_id": 0}], "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)},
    {"records": [{"forward_pass_id": 0, "global_physical_count": torch.ones(2, 3)}],
     "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)},
    {"records": [{"forward_pass_id": 0, "global_physical_count": torch.ones(2, 4)}],
     "last_physical_to_logical_map": -torch.ones(2, 4, dtype=torch.int64)},
    {"records": [], "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)},
])
def test_malformed_sglang_dumps_are_trace_errors(tmp_path, obj):
    torch.save(obj, tmp_path / "dump.pt")
    with pytest.raises(TraceError, match="dump.pt"):
        eplb_opt.read_trace(tmp_path / "dump.pt")


@pytest.mark.parametrize("text, match", [
    ('{"load_history": [{"logical_expert_load": [[1e999, 1]]}]}', "finite"),
    ('{"load_history": [{"logical_expert_load": [[' + "9" * 400 + ', 1]]}]}', "load_history"),
    ('{"load_history": [{"logical_expert_load": "abc"}]}', "load_history"),
    ('[1, 2, 3]', "load_history"),
    ('{"load_history": [[1, 2]]}', "logical_expert_load"),
    ('[' * 100000, "JSON"),
])
def test_malformed_json_traces(tmp_path, text, match):
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(TraceError, match=match):
        eplb_opt.read_trace(tmp_path / "t.json")


@pytest.mark.parametrize("suffix", [".json", ".pt", ".npz"])
def test_a_plan_file_passed_as_loads_says_so(files, suffix):
    src, _ = files
    with pytest.raises(TraceError, match="is an eplb-opt plan file, not a load trace"):
        eplb_opt.read_trace(src / f"plan{suffix}")


@pytest.mark.parametrize("kind", ["json", "pt", "npz"])
def test_a_trace_passed_as_a_plan_says_so(files, kind):
    src, _ = files
    with pytest.raises(PlanFileError, match="not an eplb-opt plan file"):
        Plan.load(src / f"loads.{kind}")


def _cli_fails(argv, capsys, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, match", [
    (["plan", "{src}/plan.json", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.json"], "plan file, not a load trace"),
    (["plan", "{src}/plan.npz", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.json"], "plan file, not a load trace"),
    (["plan", "{src}/loads.npy", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.toml"], "unknown plan file kind"),
    (["plan", "{src}/loads.npy", "--replicas", "32", "--gpus", "8", "-o", "{out}"], "is a directory"),
    (["plan", "{src}/loads.npy", "--replicas", "32", "--gpus", "8", "-o", "{out}/no/p.json"], "no such directory"),
    (["plan", "{src}/loads.npy", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.json",
      "--previous", "{src}/loads.npy"], "unknown plan file kind"),
    (["plan", "{src}/loads.npy", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.json",
      "--previous", "{src}/loads.json"], "not an eplb-opt plan file"),
    (["plan", "{src}/loads.npy", "--replicas", "40", "--gpus", "8", "-o", "{out}/p.json",
      "--previous", "{src}/plan.json"], "previous has shape"),
    (["plan", "{src}", "--replicas", "32", "--gpus", "8", "-o", "{out}/p.json"], "plan file, not a load trace"),
    (["evaluate", "{src}/loads.npy", "{src}/loads.npy"], "load-trace kind"),
    (["evaluate", "{src}/loads.json", "{src}/loads.npy"], "not an eplb-opt plan file"),
    (["evaluate", "{src}/plan.json", "{src}/plan.pt"], "plan file, not a load trace"),
    (["evaluate", "{src}/plan.json", "{src}/missing.npy"], "no such file"),
    (["report", "{src}/loads.pt", "{src}/loads.npy", "-o", "{out}/r.png"], "not an eplb-opt plan file"),
    (["report", "{src}/plan.json", "{src}/plan.npz", "-o", "{out}/r.png"], "plan file, not a load trace"),
])
def test_cli_files_of_the_wrong_kind(files, capsys, argv, match):
    src, out = files
    _cli_fails([a.format(src=src, out=out) for a in argv], capsys, match)
    assert list(out.iterdir()) == []          # nothing written, not even a temporary file


def test_cli_truncated_loads_exit_2_and_keep_the_old_plan(files, capsys):
    src, out = files
    raw = (src / "loads.npz").read_bytes()
    (src / "cut.npz").write_bytes(raw[: len(raw) // 2])
    (out / "p.json").write_text("deployed")
    _cli_fails(["plan", str(src / "cut.npz"), "--replicas", "32", "--gpus", "8", "-o", str(out / "p.json"),
                "--overwrite"], capsys, "not a readable numpy file")
    assert (out / "p.json").read_text() == "deployed"
    assert sorted(p.name for p in out.iterdir()) == ["p.json"]


# -- previous -------------------------------------------------------------------------

@pytest.fixture
def deployed():
    w = np.random.default_rng(1).random((3, 16)) * 100
    return w, eplb_opt.solve(w, num_replicas=32, num_gpus=8).plan


@pytest.mark.parametrize("make, exc, match", [
    (lambda p: p[:, :-1], InvalidProblemError, "previous has shape"),
    (lambda p: p[:2], InvalidProblemError, "previous has shape"),
    (lambda p: p[None], InvalidProblemError, "previous has shape"),
    (lambda p: np.where(p == 3, 16, p), InvalidProblemError, "not an expert id"),
    (lambda p: np.where(p == 3, -2, p), InvalidProblemError, "not an expert id"),
    (lambda p: np.where(p == 3, 4, p), InvalidProblemError, "previous is not a valid placement"),
    (lambda p: p.astype(np.float64), InvalidTypeError, "integer expert ids"),
    (lambda p: "plan.json", InvalidTypeError, "previous must be"),
    (lambda p: p.tolist()[:1] + [[1, 2]], InvalidTypeError, "previous could not be read"),
])
def test_mismatched_previous(deployed, make, exc, match):
    w, plan = deployed
    with pytest.raises(exc, match=match):
        eplb_opt.solve(w, num_replicas=32, num_gpus=8, previous=make(plan.phy2log.numpy()))


def test_previous_for_another_replica_count_is_named(deployed):
    w, plan = deployed
    with pytest.raises(InvalidProblemError, match=r"previous has shape \(3, 32\), expected .* \[3, 40\]"):
        eplb_opt.solve(w, num_replicas=40, num_gpus=8, previous=plan.phy2log)


def test_previous_accepts_a_plan_tensor_or_array(deployed):
    w, plan = deployed
    a = eplb_opt.solve(w, num_replicas=32, num_gpus=8, previous=plan)
    b = eplb_opt.solve(w, num_replicas=32, num_gpus=8, previous=plan.phy2log)
    c = eplb_opt.solve(w, num_replicas=32, num_gpus=8, previous=plan.phy2log.numpy().tolist())
    assert torch.equal(a.plan.phy2log, b.plan.phy2log) and torch.equal(b.plan.phy2log, c.plan.phy2log)
    assert int(a.moves.sum()) == 0


def test_vllm_old_map_with_unknown_ids_is_an_error_not_an_index_error(deployed):
    from eplb_opt.integrations.vllm import EplbOptPolicy

    w, plan = deployed
    old = plan.phy2log.clone()
    old[0, 0] = 99
    with pytest.raises(EplbOptError, match="old_global_expert_indices"):
        EplbOptPolicy.rebalance_experts(torch.as_tensor(w), 32, 1, 1, 8, old_global_expert_indices=old)


# -- integer loads beyond 2**53 -------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ints: np.array(ints, dtype=np.int64),
    lambda ints: np.array(ints, dtype=np.uint64),
    lambda ints: torch.tensor(ints, dtype=torch.int64),
    lambda ints: ints,                                       # Python ints
    lambda ints: np.array(ints, dtype=object),
])
def test_integers_beyond_2_53_are_read_as_float64(make):
    rng = np.random.default_rng(3)
    ints = [[int(x) for x in row] for row in rng.integers(2**54, 2**62, size=(2, 16), dtype=np.int64)]
    as_float = np.array(ints, dtype=np.float64)
    r = eplb_opt.solve(make(ints), num_replicas=24, num_gpus=8)
    ref = eplb_opt.solve(as_float, num_replicas=24, num_gpus=8)
    assert torch.equal(r.plan.phy2log, ref.plan.phy2log)
    assert np.array_equal(r.max_load, ref.max_load)
    assert (r.max_load > 2.0**54).all() and np.isfinite(r.max_load).all()


def test_python_integers_beyond_int64_and_float64():
    huge = [[2**70 + i for i in range(8)]]
    r = eplb_opt.solve(huge, num_replicas=8, num_gpus=4)
    assert r.max_load[0] == pytest.approx(2.0 * 2**70, rel=1e-12)
    with pytest.raises(InvalidProblemError, match="beyond float64"):
        eplb_opt.solve([[10**400] + [1] * 7], num_replicas=8, num_gpus=4)
    with pytest.raises(InvalidTypeError, match="numeric"):
        eplb_opt.solve([[1, None] * 4], num_replicas=8, num_gpus=4)
    with pytest.raises(InvalidTypeError, match="numeric"):
        eplb_opt.solve(np.array([[True, 1] * 4], dtype=object), num_replicas=8, num_gpus=4)


def test_integers_beyond_2_53_in_exact_mode_and_trace_files(tmp_path):
    big = np.random.default_rng(4).integers(2**55, 2**62, size=(1, 2, 16), dtype=np.int64)
    np.save(tmp_path / "big.npy", big)
    w = eplb_opt.read_trace(tmp_path / "big.npy")[0]
    assert w.dtype == np.float64 and np.array_equal(w, big[0].astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no overflow warnings anywhere
        r = eplb_opt.solve(big[0], num_replicas=24, num_gpus=8, mode="exact", time_limit=1)
    assert_consistent_certificate(r)
    assert eplb_opt.plan_violations(r.plan.phy2log.numpy(), 16, 24, 8) == []


def test_history_and_forecast_bad_types_name_the_argument():
    """solve(history=, forecast=) (issue 16): wrong types and shapes name the argument."""
    w = np.arange(2 * 16, dtype=np.float64).reshape(2, 16)
    topo = dict(num_replicas=32, num_gpus=8)
    with pytest.raises(InvalidTypeError, match="history must hold numeric loads"):
        eplb_opt.solve(w, **topo, history=np.zeros((2, 2, 16), dtype=bool))
    with pytest.raises(InvalidProblemError, match=r"history must be non-negative.*\[window 1, layer 0, expert 3\]"):
        h = np.zeros((2, 2, 16))
        h[1, 0, 3] = -1.0
        eplb_opt.solve(w, **topo, history=h)
    with pytest.raises(InvalidTypeError, match="forecast must be one of"):
        eplb_opt.solve(w, **topo, history=w[None], forecast=3)
    with pytest.raises(InvalidProblemError, match=r"history has shape \(1, 2, 8\)"):
        eplb_opt.solve(w, **topo, history=np.ones((1, 2, 8)))


@pytest.mark.parametrize("name", ["num_replicas", "num_groups", "num_nodes", "num_gpus"])
@pytest.mark.parametrize("policy", ["global", "auto"])
def test_sizes_beyond_any_cluster_are_our_errors(name, policy):
    """A size of 2**70 (found by the long fuzz profile: ``weight=[[0.0]]`` with every size
    2**70 under the global policy reached numpy's allocation, "Maximum allowed dimension
    exceeded") is an InvalidProblemError naming the argument; 2**24 itself is accepted."""
    sizes = dict(num_replicas=2**70, num_groups=2**70, num_nodes=2**70, num_gpus=2**70)
    with pytest.raises(InvalidProblemError, match="num_replicas=1180591620717411303424 is above"):
        eplb_opt.solve([[0.0]], policy=policy, **sizes)
    sizes = dict(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)
    sizes[name] = 2**70
    with pytest.raises(InvalidProblemError, match=f"{name}=1180591620717411303424 is above the largest size"):
        eplb_opt.solve([[1.0, 2.0]], policy=policy, **sizes)
    ok = eplb_opt.solve([[1.0, 2.0]], num_replicas=2, num_groups=1, num_nodes=1, num_gpus=2, policy=policy)
    assert ok.plan.phy2log.shape == (1, 2)
    plan = eplb_opt.make_problem([[1.0]], 2**24, 2**24, 2**24, 2**24, policy="global")
    assert plan.num_replicas == 2**24
