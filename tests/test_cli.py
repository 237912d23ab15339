"""The command-line interface."""

import json
import subprocess
import sys

from eplb_opt.cli import main


def test_example_prints_per_layer_and_overall(capsys):
    assert main(["example"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "gap" in out and "balancedness" in out
    assert out.count("\n") > 58  # one row per layer
    assert "certified" in out


def test_example_json(capsys):
    assert main(["example", "--json", "--preset", "deepseek-v2-lite"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 26
    assert 0 < data["balancedness"] <= 1
    for row in data["layers"]:
        assert row["lower_bound"] <= row["max_load"] * (1 + 1e-12)


def test_exact_mode_runs_from_the_cli(capsys):
    assert main(["example", "--preset", "deepseek-v2-lite", "--mode", "exact", "--time-limit", "2", "--quiet"]) == 0
    assert "balancedness" in capsys.readouterr().out


def test_console_script_module_entry():
    out = subprocess.run([sys.executable, "-m", "eplb_opt", "example", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0 and "balancedness" in out.stdout


def test_score_exit_codes(tmp_path, capsys):
    mod = tmp_path / "cand.py"
    mod.write_text(
        "import eplb_opt\n"
        "def good(w, r, g, n, p):\n    return eplb_opt.rebalance_experts(w, r, g, n, p)\n"
        "def bad(w, *a):\n    raise ValueError('nope')\n"
    )
    assert main(["score", f"{mod}:good", "--no-exact", "--suite", "quick"]) == 0
    out = capsys.readouterr()
    assert "valid" in out.out
    assert main(["score", f"{mod}:bad", "--no-ours", "--suite", "quick"]) == 1
    out = capsys.readouterr()
    assert "crashed: ValueError: nope" in out.out and "crashed or broke" in out.err


def test_score_bad_target(capsys):
    # A target that cannot be found is bad usage: exit status 2, not 1 (a crashed plan).
    assert main(["score", "nocolon"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["score", "no_such_module_xyz:f"]) == 2
    assert "no module named 'no_such_module_xyz'" in capsys.readouterr().err
