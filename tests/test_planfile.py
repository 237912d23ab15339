"""Plan files: round trips in every format, metadata, versioning, corrupt files, atomic
writes, and the TensorRT-LLM export."""

import json
import os
import stat

import numpy as np
import pytest
import torch

import eplb_opt
from eplb_opt import Plan, PlanFileError, export_tensorrt_llm
from eplb_opt.planfile import SCHEMA_VERSION, atomic_write, input_sha256
from eplb_opt.workloads import generate


@pytest.fixture(scope="module")
def solved():
    w = generate("deepseek-v3-prefill", seed=0, windows=1)[0][:4]
    return w, eplb_opt.solve(w, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)


@pytest.mark.parametrize("suffix", [".json", ".pt", ".npz"])
def test_roundtrip_keeps_maps_and_metadata(tmp_path, solved, suffix):
    w, r = solved
    path = r.plan.save(tmp_path / f"plan{suffix}")
    back = Plan.load(path)
    for a, b in zip(r.plan.to_numpy(), back.to_numpy()):
        assert np.array_equal(a, b)
    meta = dict(back.metadata)
    assert meta["library_version"] == eplb_opt.__version__
    assert meta["input_sha256"] == input_sha256(w)
    assert meta["parameters"]["num_gpus"] == 32 and meta["parameters"]["policy"] == "hierarchical"
    assert np.allclose(meta["gap"], r.gap) and np.allclose(meta["lower_bound"], r.lower_bound)
    assert meta["status"] == list(r.status)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_json_layout_is_documented_keys(tmp_path, solved):
    _, r = solved
    doc = json.loads(r.plan.save(tmp_path / "p.json").read_text())
    assert doc["schema"] == "eplb-opt/plan" and doc["version"] == SCHEMA_VERSION
    assert np.array_equal(np.array(doc["phy2log"]), r.plan.phy2log.numpy())
    assert {"phy2log", "log2phy", "logcnt", "metadata", "num_experts"} <= set(doc)


def test_unknown_version_and_foreign_files(tmp_path, solved):
    _, r = solved
    path = r.plan.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match=f"schema version {SCHEMA_VERSION + 1} is not supported"):
        Plan.load(path)
    doc["schema"] = "something-else"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match="not an eplb-opt plan file"):
        Plan.load(path)


@pytest.mark.parametrize("suffix", [".json", ".pt", ".npz"])
def test_truncated_file_is_a_clear_error(tmp_path, solved, suffix):
    _, r = solved
    path = r.plan.save(tmp_path / f"p{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanFileError, match="not a readable plan file"):
        Plan.load(path)


def test_inconsistent_maps_are_rejected(tmp_path, solved):
    _, r = solved
    path = r.plan.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["phy2log"][0][0] = (doc["phy2log"][0][0] + 1) % doc["num_experts"]   # maps disagree now
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match="corrupt plan file"):
        Plan.load(path)


def test_missing_file_and_bad_suffix(tmp_path, solved):
    _, r = solved
    with pytest.raises(PlanFileError, match="no such file"):
        Plan.load(tmp_path / "absent.json")
    with pytest.raises(PlanFileError, match="unknown plan file kind '.yaml'"):
        r.plan.save(tmp_path / "p.yaml")
    with pytest.raises(PlanFileError, match="no such directory"):
        r.plan.save(tmp_path / "nodir" / "p.json")


def test_overwrite_false_keeps_an_existing_file(tmp_path, solved):
    _, r = solved
    path = tmp_path / "p.json"
    path.write_text("precious")
    with pytest.raises(PlanFileError, match="exists"):
        r.plan.save(path, overwrite=False)
    assert path.read_text() == "precious"


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("old plan")

    def half_then_fail(tmp):
        tmp.write_text("half a pl")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_plan_from_torch_load_of_pt_file_is_plain_tensors(tmp_path, solved):
    _, r = solved
    path = r.plan.save(tmp_path / "p.pt")
    doc = torch.load(path, weights_only=True)         # readable without eplb-opt
    assert torch.equal(doc["phy2log"], r.plan.phy2log)


def test_tensorrt_llm_export(tmp_path, solved):
    _, r = solved
    path = export_tensorrt_llm(r.plan, tmp_path / "moe_load_balancer.yaml", first_layer=3)
    text = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert text[0] == "initial_global_assignments:"
    p2l = r.plan.phy2log.numpy()
    for l in range(p2l.shape[0]):
        key, vals = text[1 + l].split(":", 1)
        assert int(key) == 3 + l
        assert [int(v) for v in vals.strip(" []").split(",")] == p2l[l].tolist()
    assert f"num_slots: {p2l.shape[1]}" in text and "layer_updates_per_iter: 0" in text
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["initial_global_assignments"][3] == p2l[0].tolist()
    with pytest.raises(PlanFileError, match="layer_ids has 2 entries"):
        export_tensorrt_llm(r.plan, tmp_path / "x.yaml", layer_ids=[1, 2])
