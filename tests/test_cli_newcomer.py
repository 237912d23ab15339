"""The command line for a newcomer (issue 13, parts 4 and 5): score targets, explicit
choices never quietly changed, the policy auto picks said on stderr, legends and help
for what is printed, complete error messages, and README commands that run as written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb_opt.cli import _parser, main
from eplb_opt.workloads import generate

ROOT = Path(__file__).resolve().parents[1]
TOPO = ["--replicas", "288", "--groups", "8", "--nodes", "4", "--gpus", "32"]

POLICY_MODULE = """\
import eplb_opt

class Policy:
    @classmethod
    def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_gpus):
        return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)

    @staticmethod
    def static(weight, num_replicas, num_groups, num_nodes, num_gpus):
        return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]

    def plain(self, weight, num_replicas, num_groups, num_nodes, num_gpus):
        return eplb_opt.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)

class NeedsArgs:
    def __init__(self, config):
        self.config = config

    def plain(self, weight, *args):
        return None
"""


@pytest.fixture
def loads(tmp_path):
    """A small [L, E] load file of the DeepSeek-V3 prefill shape (4 layers)."""
    path = tmp_path / "w.npy"
    np.save(path, generate("deepseek-v3-prefill", seed=0, windows=1)[0][:4])
    return path


@pytest.fixture
def keep_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


# -- score: MODULE:Class.method, and a target that cannot be found exits 2

@pytest.mark.parametrize("attr", ["Policy.rebalance_experts", "Policy.static", "Policy.plain"])
def test_score_file_class_method(tmp_path, capsys, keep_sys_path, attr):
    mod = tmp_path / "policy_file.py"
    mod.write_text(POLICY_MODULE)
    assert main(["score", f"{mod}:{attr}", "--no-ours", "--suite", "quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["invalid"] == 0 and len(data["scores"]) == 6


def test_score_module_class_method_from_the_current_directory(tmp_path, capsys, monkeypatch, keep_sys_path):
    (tmp_path / "eplb_newcomer_policy.py").write_text(POLICY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "eplb_newcomer_policy", raising=False)
    assert main(["score", "eplb_newcomer_policy:Policy.rebalance_experts", "--no-ours", "--suite", "quick"]) == 0
    out = capsys.readouterr().out
    assert "eplb_newcomer_policy:Policy.rebalance_experts" in out and "NO" not in out
    assert "slot: slot-level balancedness" in out          # the columns are explained


def test_score_package_function():
    from eplb_opt.cli import _load_callable
    import eplb_opt

    assert _load_callable("eplb_opt:rebalance_experts") is eplb_opt.rebalance_experts
    assert _load_callable("eplb_opt.api:solve") is eplb_opt.solve


@pytest.mark.parametrize("target, message", [
    ("nocolon", "expected MODULE:FUNCTION, MODULE:Class.method"),
    ("mod:", "expected MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("no_such_module_xyz.sub:f", "no module named 'no_such_module_xyz'"),
    ("eplb_opt:no_such_function", "'eplb_opt' has no attribute 'no_such_function'"),
    ("eplb_opt:SolveResult.nope", "has no attribute 'nope'"),
    ("eplb_opt:SolveResult", "a class, not a function"),
    ("eplb_opt:__version__", "str, not a function"),
    ("missing/dir/file.py:f", "no such file 'missing/dir/file.py'"),
])
def test_score_target_not_found_exits_2(target, message, capsys, keep_sys_path):
    assert main(["score", target, "--no-ours"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb-opt: error: score: ") and message in err, err


def test_score_target_errors_in_the_module_exit_2(tmp_path, capsys, keep_sys_path):
    broken = tmp_path / "broken_mod.py"
    broken.write_text("import no_such_dependency_xyz\n")
    assert main(["score", f"{broken}:f", "--no-ours"]) == 2
    assert "cannot import" in capsys.readouterr().err
    mod = tmp_path / "policy_file.py"
    mod.write_text(POLICY_MODULE)
    assert main(["score", f"{mod}:NeedsArgs.plain", "--no-ours"]) == 2
    err = capsys.readouterr().err
    assert "instance method" in err and "NeedsArgs() failed" in err
    assert main(["score", f"{mod}:Policy.missing", "--no-ours"]) == 2
    assert "'Policy' has no attribute 'missing'" in capsys.readouterr().err.replace(f"{mod}:", "")


# -- explicit choices are never quietly changed

@pytest.mark.parametrize("policy", ["hierarchical", "spill"])
def test_plan_explicit_policy_with_masked_gpus_is_an_error(policy, loads, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", str(loads), *TOPO, "--policy", policy, "--masked-gpus", "3,7", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--policy {policy}" in err and "--masked-gpus 3,7" in err and "--policy global" in err
    assert not out.exists()


def test_plan_masked_gpus_with_global_or_auto(loads, tmp_path, capsys):
    assert main(["plan", str(loads), *TOPO, "--policy", "global", "--masked-gpus", "3", "-o",
                 str(tmp_path / "g.json")]) == 0
    assert "policy auto" not in capsys.readouterr().err
    assert main(["plan", str(loads), *TOPO, "--masked-gpus", "3", "-o", str(tmp_path / "a.json"), "--json"]) == 0
    cap = capsys.readouterr()
    assert "policy auto -> global: masked GPUs leave the 4 nodes with unequal GPU counts" in cap.err
    assert json.loads(cap.out)["policy"] == "global"


def test_plan_auto_says_which_policy_and_why(loads, tmp_path, capsys):
    assert main(["plan", str(loads), "--replicas", "288", "--groups", "4", "--nodes", "3", "--gpus", "24",
                 "-o", str(tmp_path / "a.json")]) == 0
    cap = capsys.readouterr()
    assert "eplb-opt: policy auto -> global: 4 groups do not divide evenly over 3 nodes" in cap.err
    assert "policy global" in cap.out
    assert main(["plan", str(loads), *TOPO, "-o", str(tmp_path / "b.json")]) == 0
    cap = capsys.readouterr()
    assert "policy auto -> hierarchical: 8 groups divide evenly over 4 nodes" in cap.err
    assert main(["plan", str(loads), *TOPO, "--policy", "hierarchical", "-o", str(tmp_path / "c.json")]) == 0
    assert "policy auto" not in capsys.readouterr().err               # explicit: nothing to explain
    assert main(["plan", str(loads), "--replicas", "288", "--gpus", "32", "-o", str(tmp_path / "d.json")]) == 0
    assert "policy auto" not in capsys.readouterr().err               # one node: the choice changes nothing


def test_sglang_elasticity_with_inactive_ranks_asks_for_the_global_policy(monkeypatch):
    """SGLang's elasticity-aware algorithm plans globally while ranks are inactive; the
    integration asks solve for that (not for the hierarchical policy, which solve would
    have to switch), and the plan is the one it gave before."""
    import eplb_opt
    import eplb_opt.api
    from eplb_opt.integrations import sglang as eplb_sglang

    w = torch.from_numpy(generate("deepseek-v3-prefill", seed=0, windows=1)[0][:4])
    active = np.ones(32, dtype=bool)
    active[5] = False
    calls, real = [], eplb_opt.api.solve
    monkeypatch.setattr(eplb_opt.api, "solve", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    p2l = eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, "elasticity_aware_hierarchical", active_ranks=active)[0]
    assert calls[0]["policy"] == "global"
    # The same plan as before the change, when solve switched hierarchical to global itself.
    same = real(w, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32, policy="global",
                masked_gpus=~active, deterministic=True).plan.phy2log
    assert torch.equal(p2l, same)
    try:
        switched = real(w, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32, policy="hierarchical",
                        masked_gpus=~active, deterministic=True).plan.phy2log
    except eplb_opt.InvalidProblemError:
        pass                                     # solve refuses the explicit choice (issue 13)
    else:
        assert torch.equal(p2l, switched)
    calls.clear()
    eplb_sglang.rebalance_experts(w, 288, 9, 8, 4, "elasticity_aware_hierarchical")
    assert calls[0]["policy"] == "hierarchical"                           # every rank active


# -- what is printed is explained, in command-line terms

def test_example_prints_cli_hints_and_legends(capsys):
    assert main(["example"]) == 0
    cap = capsys.readouterr()
    assert "try --policy global" in cap.out and "policy='global'" not in cap.out
    assert "'bound' = the part of the lower bound that sets it: average" in cap.out
    assert "node / node_replica" in cap.out
    assert "slot-level balancedness: the same mean / max ratio over single replica slots" in cap.out
    assert "policy auto -> hierarchical: 8 groups divide evenly over 4 nodes" in cap.err


def test_plan_and_evaluate_explain_slot_level(loads, tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert main(["plan", str(loads), *TOPO, "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "try --policy global" in out and "policy='global'" not in out
    assert main(["evaluate", str(plan), str(loads)]) == 0
    out = capsys.readouterr().out
    assert "slot-level" in out and "over single replica slots instead of GPUs" in out


def test_write_loads_hint_is_a_command_that_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert main(["example", "--preset", "deepseek-v2-lite", "--write-loads", str(tmp_path)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("plan it with: eplb-opt plan ")
    args = hint.split("plan it with: eplb-opt ", 1)[1].split()
    args[args.index("-o") + 1] = str(tmp_path / "plan.json")
    assert main(args) == 0


def _subparsers():
    return next(a for a in _parser()._actions if a.dest == "command").choices


def test_topology_options_have_help():
    seen = 0
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.dest in ("groups", "nodes", "gpus", "replicas", "policy"):
                assert action.help and len(action.help) > 20, (name, action.dest)
                seen += 1
    assert seen >= 6
    text = _subparsers()["plan"].format_help()
    assert "n_group" in text and "GPUs in total" in text and "server nodes" in text


def test_adrs_is_spelled_out_where_it_appears():
    for name, sub in _subparsers().items():
        text = sub.format_help()
        if "ADRS" in text:
            # (argparse may wrap the line after the hyphen)
            assert "AI-Driven Research for Systems" in re.sub(r"-\s+", "-", " ".join(text.split())), name
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        if "ADRS" in text:
            first = text.index("ADRS")
            assert "AI-Driven Research for Systems" in " ".join(text[first:first + 300].split()), doc


def test_example_help_explains_the_columns():
    text = _subparsers()["example"].format_help()
    assert "'bound' = the part of the lower bound" in text and "slot-level balancedness" in text


# -- torch's "Weights only load failed": a complete message

class Opaque:
    pass


def test_weights_only_failure_is_a_complete_message(tmp_path, capsys):
    bad = tmp_path / "objects.pt"
    torch.save({"loads": Opaque()}, bad)
    assert main(["plan", str(bad), *TOPO, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"eplb-opt: error: {bad}: not a readable torch file: it holds a Python object (")
    assert "Opaque) that a safe load refuses" in err and "weights_only=True" in err
    assert "torch.save(torch.as_tensor(loads), path)" in err and err.endswith(")")
    assert "two options" not in err and "\x1b" not in err and "\n" not in err
    # A plan file holding objects, and a file that is no torch file at all.
    from eplb_opt import Plan, PlanFileError

    with pytest.raises(PlanFileError, match=r"holds a Python object \(.*Opaque\) that a safe load refuses.*"
                                            r"write plan files with eplb-opt plan or eplb_opt\.Plan\.save"):
        Plan.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    assert main(["plan", str(junk), *TOPO, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "it is not a torch file or it is corrupt" in err and "two options" not in err


def test_long_torch_errors_end_on_a_whole_sentence(tmp_path, capsys):
    import io

    buf = io.BytesIO()
    torch.save(torch.ones(3), buf)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(buf.getvalue()[:200])
    assert main(["plan", str(cut), *TOPO, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable torch file" in err and err.endswith((".", "...", ")"))


# -- bench: usage errors exit 2; left-out peers are in the report

def test_bench_usage_errors_exit_2(tmp_path, capsys):
    trace = tmp_path / "t.npy"
    np.save(trace, generate("deepseek-v2-lite", seed=0, windows=2))
    assert main(["bench", "--trace", str(trace), "--out", str(tmp_path / "o")]) == 2
    assert "--trace needs --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:                      # argparse: an unknown preset
        main(["bench", "--trace", str(trace), "--preset", "nope"])
    assert exc.value.code == 2
    assert main(["bench", "--trace", str(trace), "--preset", "deepseek-v2-lite", "--out", str(tmp_path / "o")]) == 2
    assert "needs at least two windows" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                        # refused before anything was written


def test_bench_report_names_left_out_peers(tmp_path, monkeypatch, capsys):
    from eplb_opt.bench import runner

    why = "DeepSeek EPLB (sglang 0.5.23): PeerUnavailable: sglang==0.5.23 is not in the peer cache"
    monkeypatch.setattr(runner, "available_peers", lambda: {"_missing": [why]})
    trace = tmp_path / "t.npy"
    np.save(trace, generate("deepseek-v2-lite", seed=0, windows=4)[:, :3])
    out = tmp_path / "o"
    assert main(["bench", "--trace", str(trace), "--preset", "deepseek-v2-lite", "--window", "2",
                 "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert f"peer unavailable, left out: {why}" in cap.err
    report = (out / "REPORT.md").read_text()
    assert "Peers left out (could not be loaded here): 1." in report and why in report
    data = json.loads((out / "results.json").read_text())
    assert data["missing_peers"] == [why] and data["command"].startswith("eplb-opt bench --trace")


def test_fetch_wheel_offline_is_peer_unavailable(tmp_path, monkeypatch):
    from eplb_opt.bench import peers

    monkeypatch.setenv("EPLB_OPT_PEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(peers, "_FAILED", {})
    with pytest.raises(peers.PeerUnavailable, match=r"sglang==0\.5\.23 is not in the peer cache .*cache"):
        peers.fetch_wheel("sglang==0.5.23")
    # The failure is remembered: no second pip run in this process.
    monkeypatch.setattr(peers.subprocess, "run", lambda *a, **k: pytest.fail("pip ran twice"))
    with pytest.raises(peers.PeerUnavailable):
        peers.fetch_wheel("sglang==0.5.23")


# -- the README: commands run as written after the set-up

def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


# The README and the pages it sends a newcomer to.
DOCS = ("README.md", "docs/USAGE.md", "docs/INTEGRATIONS.md")


@pytest.mark.parametrize("doc", DOCS)
def test_readme_commands_use_the_venv(doc):
    readme = (ROOT / doc).read_text()
    blocks = _bash_blocks(readme)
    if doc == "README.md":
        first = blocks[0].strip().splitlines()
        assert len(first) == 2 and all(line.startswith("bash scripts/setup.sh && .venv/bin/") for line in first)
    for block in blocks:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            line = line.strip()
            if i and lines[i - 1].rstrip().endswith("\\"):
                continue                        # a continued command (e.g. a server's launch)
            assert not re.match(r"(eplb-opt|python|python3|pytest) ", line), (
                f"README command {line!r} is not found in a fresh shell; write .venv/bin/...")
    # Inline commands too: every `eplb-opt <command>` meant to be run is in the synopsis
    # (```text) or names .venv/bin/.
    assert "`python scripts/gen_api_docs.py`" not in readme
    assert "`python -m benchmarks." not in readme
