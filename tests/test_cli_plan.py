"""`eplb-opt plan / evaluate / report`: end to end on trace files, JSON output, exit
codes, interrupts and atomic writes."""

import json
import time

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import Plan
from eplb_opt import cli
from eplb_opt.cli import main
from eplb_opt.workloads import generate

TOPO = ["--replicas", "288", "--groups", "8", "--nodes", "4", "--gpus", "32"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    w = generate("deepseek-v3-prefill", seed=5, windows=2)[:, :6]       # [2, 6, 256]
    steps = np.stack([w[0] * 0.25, w[0] * 0.75])                          # two steps of window 0
    np.save(d / "steps.npy", steps)
    torch.save(torch.from_numpy(w[0]), d / "w0.pt")
    np.save(d / "w1.npy", w[1])
    from safetensors.numpy import save_file

    save_file({"tokens_per_expert": steps}, str(d / "steps.safetensors"))
    return d, w


def test_plan_from_every_format_gives_the_same_plan(tmp_path, traces, capsys):
    d, w = traces
    ref = eplb_opt.solve(w[0], num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    for src in ("steps.npy", "w0.pt", "steps.safetensors"):
        out = tmp_path / f"{src}.json"
        assert main(["plan", str(d / src), *TOPO, "-o", str(out)]) == 0
        assert np.array_equal(Plan.load(out).phy2log.numpy(), ref.plan.phy2log.numpy()), src
    assert "wrote" in capsys.readouterr().out


def test_plan_json_output_and_evaluate(tmp_path, traces, capsys):
    d, w = traces
    plan = tmp_path / "plan.npz"
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--json", "-o", str(plan)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"] == str(plan) and 0 < info["balancedness"] <= 1 and len(info["status"]) == 6

    assert main(["evaluate", str(plan), str(d / "steps.npy"), str(d / "w1.npy"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["valid"] and [r["file"] for r in ev["loads"]] == [str(d / "steps.npy"), str(d / "w1.npy")]
    in_window, next_window = ev["loads"]
    assert abs(in_window["balancedness"] - info["balancedness"]) < 1e-12
    assert in_window["balancedness"] <= in_window["ceiling"] + 1e-12
    p2l = Plan.load(plan).phy2log.numpy()
    assert abs(next_window["balancedness"] - eplb_opt.balancedness(eplb_opt.gpu_loads(w[1], p2l, 32))) < 1e-12

    assert main(["evaluate", str(plan), str(d / "w1.npy")]) == 0
    assert "valid plan" in capsys.readouterr().out


def test_evaluate_flags_a_plan_that_breaks_its_policy(tmp_path, traces, capsys):
    d, w = traces
    good = eplb_opt.solve(w[0], num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    p2l = good.plan.phy2log.numpy().copy()
    # Swap a slot between nodes 0 and 1: counts stay right, groups now straddle nodes.
    p2l[:, [0, 72]] = p2l[:, [72, 0]]
    bad = Plan.from_numpy(p2l, 256, metadata=dict(good.plan.metadata))
    path = bad.save(tmp_path / "bad.json")
    assert main(["evaluate", str(path), str(d / "w1.npy")]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_exit_codes_for_bad_input(tmp_path, traces, capsys):
    d, _ = traces
    out = tmp_path / "p.json"
    assert main(["plan", str(d / "steps.npy"), "--replicas", "290", "--gpus", "32", "-o", str(out)]) == 2
    assert "num_replicas" in capsys.readouterr().err and not out.exists()
    assert main(["plan", str(tmp_path / "absent.npy"), *TOPO, "-o", str(out)]) == 2
    assert not out.exists()
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((3, 256)))
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(out)]) == 0
    assert main(["evaluate", str(out), str(wrong)]) == 2
    assert "holds loads (3, 256)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:                 # argparse usage error
        main(["plan", str(d / "steps.npy"), "--gpus", "32", "-o", str(out)])
    assert exc.value.code == 2


def test_existing_plan_is_kept_without_overwrite(tmp_path, traces, capsys):
    d, _ = traces
    out = tmp_path / "p.json"
    out.write_text("keep me")
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(out), "--overwrite"]) == 0
    assert Plan.load(out).num_layers == 6


def test_interrupt_leaves_no_plan_and_keeps_the_old_one(tmp_path, traces, monkeypatch, capsys):
    d, _ = traces
    out = tmp_path / "p.json"
    out.write_text("old plan")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "solve", interrupted)
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(out), "--overwrite"]) == 130
    assert out.read_text() == "old plan"
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_exact_plan_with_progress_bar(tmp_path, traces, monkeypatch, capsys):
    d, _ = traces
    out = tmp_path / "p.pt"
    real = cli.solve

    def slow_solve(loads, **kw):        # a run long enough for the bar, whatever the machine
        time.sleep(2.6)
        return real(loads, **kw)

    monkeypatch.setattr(cli, "solve", slow_solve)
    assert main(["plan", str(d / "steps.npy"), "--replicas", "320", "--gpus", "64", "--mode", "exact",
                 "--time-limit", "1", "--progress", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "planning (exact) [" in err and "/ 1 s" in err       # drawn after 2 s
    meta = dict(Plan.load(out).metadata)
    assert meta["parameters"]["mode"] == "exact" and meta["parameters"]["num_gpus"] == 64


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_report_writes_a_file(tmp_path, traces, suffix, capsys):
    d, _ = traces
    plan = tmp_path / "p.json"
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(plan)]) == 0
    out = tmp_path / f"report{suffix}"
    assert main(["report", str(plan), str(d / "w1.npy"), "-o", str(out)]) == 0
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    else:
        text = data.decode()
        assert "<html" in text.lower() and "data:image/png;base64," in text and "balancedness" in text


def test_plan_ray_flag_reaches_solve(tmp_path, traces, monkeypatch):
    d, _ = traces
    seen = {}

    def fake_solve(loads, **kw):
        seen.update(kw)
        return eplb_opt.solve(loads, **{k: v for k, v in kw.items() if k not in ("executor", "ray_address")})

    monkeypatch.setattr(cli, "solve", fake_solve)
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--ray", "-o", str(tmp_path / "a.json")]) == 0
    assert seen["executor"] == "ray" and seen["ray_address"] is None
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--ray", "auto", "-o", str(tmp_path / "b.json")]) == 0
    assert seen["ray_address"] == "auto"


def test_bundled_example_end_to_end(tmp_path, capsys):
    ex = tmp_path / "ex"
    assert main(["example", "--write-loads", str(ex), "--preset", "deepseek-v2-lite"]) == 0
    assert "eplb-opt plan" in capsys.readouterr().out
    w0 = np.load(ex / "window0.npy")
    assert w0.shape == (26, 64) and np.array_equal(w0, generate("deepseek-v2-lite", windows=2)[0])
    from eplb_opt.workloads import PRESETS

    t = PRESETS["deepseek-v2-lite"].topology()
    topo = ["--replicas", str(t["num_replicas"]), "--groups", str(t["num_groups"]),
            "--nodes", str(t["num_nodes"]), "--gpus", str(t["num_gpus"])]
    plan = tmp_path / "plan.json"
    assert main(["plan", str(ex / "window0.npy"), *topo, "-o", str(plan)]) == 0
    assert main(["evaluate", str(plan), str(ex / "window0.npy"), str(ex / "window1.npy")]) == 0
    assert main(["report", str(plan), str(ex / "window1.npy"), "-o", str(tmp_path / "r.png")]) == 0


def test_plan_beyond_balance_options(tmp_path, traces, capsys):
    d, w = traces
    p0 = tmp_path / "p0.json"
    assert main(["plan", str(d / "steps.npy"), *TOPO, "-o", str(p0)]) == 0
    np.save(tmp_path / "w1.npy", w[1])
    capsys.readouterr()
    p1 = tmp_path / "p1.json"
    assert main(["plan", str(tmp_path / "w1.npy"), *TOPO, "--previous", str(p0), "--max-balance-loss", "0.005",
                 "--bytes-per-expert", "100", "--json", "-o", str(p1)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["migration"]["moves"] < info["migration"]["baseline_moves"]
    assert info["migration"]["bytes"] == 100 * info["migration"]["moves"]
    # windows: the two steps as windows, worst objective
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--window", "1", "--objective", "worst", "--json",
                 "-o", str(tmp_path / "pw.json")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["objective"] == "worst" and len(info["window_balancedness"]) == 2
    # a failed GPU, then evaluate and report it
    pm = tmp_path / "pm.json"
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--masked-gpus", "4,5", "-o", str(pm)]) == 0
    assert (Plan.load(pm).phy2log.numpy()[:, 36:54] == -1).all()
    capsys.readouterr()
    assert main(["evaluate", str(pm), str(d / "w1.npy"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["valid"] and ev["loads"][0]["ceiling"] <= 30 / 32 + 1e-9
    assert main(["report", str(pm), str(d / "w1.npy"), "-o", str(tmp_path / "pm.png")]) == 0
    capsys.readouterr()
    # the spill policy
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--policy", "spill", "--cross-node-cost", "0.5", "--json",
                 "-o", str(tmp_path / "ps.json")]) == 0
    assert json.loads(capsys.readouterr().out)["off_node_share"] > 0
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--max-balance-loss", "0.1", "-o", str(tmp_path / "x.json")]) == 2
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--masked-gpus", "a,b", "-o", str(tmp_path / "x.json")]) == 2


def test_plan_history_and_forecast(tmp_path, traces, capsys):
    """--history FILE: past windows [H, L, E], oldest first, in any format plan reads;
    --forecast picks the forecast (default solve's, windows-ema)."""
    d, w = traces
    past = np.ascontiguousarray(generate("deepseek-v3-prefill", seed=6, windows=3, drift=0.3)[:, :6])   # [3, 6, 256]
    np.save(tmp_path / "h.npy", past)
    from safetensors.numpy import save_file

    save_file({"tokens_per_expert": past}, str(tmp_path / "h.safetensors"))
    torch.save(torch.from_numpy(past), tmp_path / "h.pt")
    topo = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    ref = eplb_opt.solve(w[1], history=past, **topo)
    for src in ("h.npy", "h.safetensors", "h.pt"):
        out = tmp_path / f"{src}.json"
        assert main(["plan", str(d / "w1.npy"), *TOPO, "--history", str(tmp_path / src), "-o", str(out)]) == 0, src
        assert np.array_equal(Plan.load(out).phy2log.numpy(), ref.plan.phy2log.numpy()), src
    ema = eplb_opt.solve(w[1], history=past, forecast="ema", **topo)
    out = tmp_path / "ema.json"
    assert main(["plan", str(d / "w1.npy"), *TOPO, "--history", str(tmp_path / "h.npy"), "--forecast", "ema",
                 "-o", str(out), "--json"]) == 0
    assert np.array_equal(Plan.load(out).phy2log.numpy(), ema.plan.phy2log.numpy())
    assert "forecast='ema'" in capsys.readouterr().out
    # A [L, E] history file is one past window.
    np.save(tmp_path / "one.npy", past[-1])
    one = eplb_opt.solve(w[1], history=past[-1:], **topo)
    assert main(["plan", str(d / "w1.npy"), *TOPO, "--history", str(tmp_path / "one.npy"), "-o",
                 str(tmp_path / "one.json")]) == 0
    assert np.array_equal(Plan.load(tmp_path / "one.json").phy2log.numpy(), one.plan.phy2log.numpy())


def test_plan_history_errors(tmp_path, traces, capsys):
    d, _ = traces
    out = tmp_path / "p.json"
    assert main(["plan", str(d / "w1.npy"), *TOPO, "--forecast", "ema", "-o", str(out)]) == 2
    assert "--forecast ema needs --history FILE" in capsys.readouterr().err and not out.exists()
    np.save(tmp_path / "bad.npy", np.ones((2, 6, 128)))
    assert main(["plan", str(d / "w1.npy"), *TOPO, "--history", str(tmp_path / "bad.npy"), "-o", str(out)]) == 2
    assert "--history" in capsys.readouterr().err and not out.exists()
    np.save(tmp_path / "h.npy", np.ones((2, 6, 256)))
    assert main(["plan", str(d / "steps.npy"), *TOPO, "--history", str(tmp_path / "h.npy"), "--objective", "worst",
                 "--window", "1", "-o", str(out)]) == 2
    assert "history" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exc:                 # argparse: an unknown forecast
        main(["plan", str(d / "w1.npy"), *TOPO, "--history", str(tmp_path / "h.npy"), "--forecast", "psychic",
              "-o", str(out)])
    assert exc.value.code == 2
