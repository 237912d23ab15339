"""Trace readers: ADRS json, numpy, torch tensors and SGLang dumps; bad files."""

import json

import numpy as np
import pytest
import torch

from eplb_opt.traces import TraceError, read_trace, windows


@pytest.fixture
def steps():
    rng = np.random.default_rng(0)
    return rng.integers(0, 50, size=(6, 3, 8)).astype(np.float64)


def test_windows_sum_fixed_size_steps(steps):
    w = windows(steps, 2)
    assert w.shape == (3, 3, 8)
    assert np.array_equal(w[1], steps[2] + steps[3])
    assert windows(steps, None).shape == (1, 3, 8)
    assert windows(steps, 4).shape == (1, 3, 8)          # partial window dropped


def test_adrs_json(tmp_path, steps):
    p = tmp_path / "expert-load.json"
    p.write_text(json.dumps({"load_history": [{"logical_expert_load": s.tolist()} for s in steps]}))
    assert np.array_equal(read_trace(p), steps.sum(axis=0, keepdims=True))
    assert read_trace(p, window=3).shape == (2, 3, 8)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_arrays(tmp_path, steps, suffix):
    p = tmp_path / f"loads{suffix}"
    if suffix == ".npy":
        np.save(p, steps)
    elif suffix == ".npz":
        np.savez(p, loads=steps, other=np.zeros(2))
    else:
        torch.save(torch.from_numpy(steps), p)
    assert np.array_equal(read_trace(p, window=1), steps)


def test_sglang_stat_dump(tmp_path, steps):
    torch.save({"rank": 0, "logical_count": torch.from_numpy(steps)}, tmp_path / "expert_distribution_recorder_1.pt")
    assert np.array_equal(read_trace(tmp_path / "expert_distribution_recorder_1.pt", window=2), windows(steps, 2))
    assert np.array_equal(read_trace(tmp_path, window=1), steps)


def test_sglang_per_pass_dump(tmp_path):
    # 2 layers, 4 logical experts, 5 physical slots; two ranks' records per pass.
    p2l = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 1]])
    recs = []
    for fp in (0, 1):
        for rank in (0, 1):
            recs.append({"forward_pass_id": fp, "rank": rank,
                         "global_physical_count": torch.full((2, 5), float(fp + 1))})
    torch.save({"records": recs, "last_physical_to_logical_map": p2l}, tmp_path / "d_0.pt")
    got = read_trace(tmp_path, window=1)
    assert got.shape == (2, 2, 4)
    # Pass 1: every slot counted 2 (two ranks x 1); expert 0 of layer 0 holds 2 slots.
    assert got[0, 0, 0] == 4.0 and got[0, 0, 1] == 2.0 and got[1, 1, 1] == 8.0


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"nope": 1}', "load_history"),
        ("{not json", "not a readable JSON"),
        ('{"load_history": []}', "empty"),
        ('{"load_history": [{"logical_expert_load": [[1, 2], [3]]}]}', "layers, experts"),
        ('{"load_history": [{"logical_expert_load": [[1, -2]]}]}', "non-negative"),
    ],
)
def test_bad_json(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TraceError, match=match):
        read_trace(p)


def test_bad_files(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(TraceError, match="unknown trace kind"):
        read_trace(tmp_path / "x.csv")
    (tmp_path / "trunc.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(TraceError, match="not a readable numpy"):
        read_trace(tmp_path / "trunc.npy")
    torch.save({"weird": 1}, tmp_path / "w.pt")
    with pytest.raises(TraceError, match="SGLang"):
        read_trace(tmp_path / "w.pt")
    with pytest.raises(TraceError, match="no \\*.pt"):
        read_trace(tmp_path / "sub" if (tmp_path / "sub").mkdir() is None else tmp_path)
    assert issubclass(TraceError, ValueError)
