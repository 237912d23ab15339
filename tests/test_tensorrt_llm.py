"""TensorRT-LLM both ways: its expert-statistic dump read as a trace (read_trace, plan,
bench --trace), and plans written as its offline EP load-balancer YAML (export and
`eplb-opt plan -o FILE.yaml`), checked the way TensorRT-LLM reads them.

The dump and the loader checks below transcribe NVIDIA/TensorRT-LLM:
* tensorrt_llm/_torch/expert_statistic.py (commit 0fccc5b97dd7b23c438e740b3bf4dcde607266c4):
  the writer (per-rank bincount records "<iter>_<layer>", rank<r>.safetensors, meta_info.json);
* examples/wide_ep/ep_load_balancer/utils.py (commit 7ce477f3c73bffd52edebf6ffbd10d530dff2e6f):
  load_expert_statistic, the reader whose sums we must reproduce;
* tensorrt_llm/llmapi/llm_args.py (commit 0004396720054fd8e205cbf616f21f0b57c6b412):
  yaml.safe_load -> MoeLoadBalancerConfig(**doc), get_layer_initial_global_assignments;
* cpp/tensorrt_llm/runtime/moeLoadBalancer/moeLoadBalancer.cpp (commit
  0d919a4f8ddc94539e9f1c850898e9b3b5d0ca07): setInitialWeightAssignments checks
  0 <= expertId < expertCount for every slot.
"""

import glob
import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import eplb_opt
from eplb_opt import Plan, PlanFileError, export_tensorrt_llm
from eplb_opt.cli import main
from eplb_opt.errors import InvalidTypeError
from eplb_opt.traces import TraceError, read_tensorrt_llm, read_trace, trace_layer_ids

E, K, R, G = 16, 2, 20, 4            # experts, top-k, slots, GPUs (5 slots per GPU)
TOPO = ["--replicas", str(R), "--gpus", str(G)]
LAYERS = [3, 4, 5]                   # DeepSeek-style: the first three layers are dense
ITERS = range(100, 106)              # EXPERT_STATISTIC_ITER_RANGE=100-106


def write_dump(path: Path, *, ranks=2, layers=LAYERS, iters=ITERS, num_experts=E, top_k=K, seed=0,
               skew=True) -> dict:
    """Write a dump exactly as TensorRT-LLM's ExpertStatistic does: each rank routes its own
    tokens, adds torch.bincount(token_selected_experts.flatten(), minlength=expert_count)
    to record f"{iter}_{layer}", saves rank{r}.safetensors with safetensors.torch, and rank
    0 writes meta_info.json.  Returns the records per rank."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(4.0, 0.2, num_experts) if skew else torch.ones(num_experts)
    per_rank = {}
    for rank in range(ranks):
        records = {}
        for it in iters:
            for layer in layers:
                tokens = int(torch.randint(20, 60, (1,), generator=gen))
                sel = torch.multinomial(popularity.roll(layer), tokens * top_k, replacement=True,
                                        generator=gen).view(tokens, top_k)
                counts = torch.bincount(sel.flatten(), minlength=num_experts)
                key = f"{it}_{layer}"
                if key not in records:
                    records[key] = counts.cpu()
                else:
                    records[key] += counts.cpu()
        if rank == 0:
            with open(path / "meta_info.json", "w") as f:
                json.dump({"num_experts": num_experts, "num_experts_per_token": top_k}, f)
        safetensors.torch.save_file(records, str(path / f"rank{rank}.safetensors"))
        per_rank[rank] = records
    return per_rank


def trtllm_load_expert_statistic(path):
    """TensorRT-LLM's examples/wide_ep/ep_load_balancer/utils.py load_expert_statistic."""
    with open(f"{path}/meta_info.json") as f:
        meta_info = json.load(f)
    files = [f for f in glob.glob(f"{path}/rank*.safetensors") if not f.endswith("_raw.safetensors")]
    statistic = {}
    for statistic_file in files:
        for key, data in safetensors.torch.load_file(statistic_file).items():
            if key not in statistic:
                statistic[key] = torch.zeros_like(data)
            statistic[key] += data
    statistic = {tuple(int(x) for x in key.split("_")): data for key, data in statistic.items()}
    iters = sorted({i for i, _ in statistic})
    layers = sorted({l for _, l in statistic})
    assert iters[-1] + 1 - iters[0] == len(iters)
    assert len(statistic) == len(iters) * len(layers)
    meta_info.update(ep_size=len(files), iter_start=iters[0], iter_stop=iters[-1] + 1, layers=layers)
    return meta_info, statistic


def trtllm_read_load_balancer(path, *, ep_size, num_experts, moe_layers):
    """What TensorRT-LLM does with moe_config.load_balancer: yaml.safe_load, then
    MoeLoadBalancerConfig(**doc) (fields num_slots: int, initial_global_assignments:
    Dict[int, List[int]], layer_updates_per_iter: int; a StrictBaseModel), setup(ep_rank,
    ep_size) (num_slots % ep_size == 0), get_layer_initial_global_assignments per MoE
    layer (the key must exist, len == num_slots), and the C++ check per slot."""
    yaml = pytest.importorskip("yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    assert set(doc) <= {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert type(doc["num_slots"]) is int and type(doc.get("layer_updates_per_iter", 0)) is int
    igs = doc["initial_global_assignments"]
    assert all(type(k) is int for k in igs) and all(type(e) is int for v in igs.values() for e in v)
    assert doc["num_slots"] % ep_size == 0
    for layer_idx in moe_layers:
        if layer_idx not in igs:
            raise KeyError(f"layer_idx {layer_idx} not found in `initial_global_assignments`.")
        assignments = igs[layer_idx]
        assert len(assignments) == doc["num_slots"]
        for expert_id in assignments:
            assert 0 <= expert_id < num_experts, f"expertId={expert_id}"
    return doc


def parse_yaml_by_hand(path):
    """The YAML without PyYAML (so these tests run, and can fail, without it)."""
    igs, scalars = {}, {}
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith("#") or line == "initial_global_assignments:":
            continue
        m = re.fullmatch(r"  (\d+): \[([\d, ]*)\]", line)
        if m:
            igs[int(m.group(1))] = [int(v) for v in m.group(2).split(",")]
            continue
        k, v = line.split(": ")
        scalars[k] = int(v)
    return igs, scalars


@pytest.fixture
def dump(tmp_path):
    d = tmp_path / "expert_statistic"
    return d, write_dump(d)


# --- reading the dump -------------------------------------------------------------------


def test_dump_reads_as_tensorrt_llm_sums_it(dump):
    d, per_rank = dump
    got = read_tensorrt_llm(d)
    assert got.layer_ids == LAYERS and got.iterations == list(ITERS)
    assert (got.num_experts, got.num_experts_per_token, got.ranks) == (E, K, 2)
    assert got.steps.shape == (len(ITERS), len(LAYERS), E) and got.steps.dtype == np.float64
    _, theirs = trtllm_load_expert_statistic(d)
    for i, it in enumerate(ITERS):
        for j, layer in enumerate(LAYERS):
            assert np.array_equal(got.steps[i, j], theirs[(it, layer)].numpy())
            assert np.array_equal(got.steps[i, j], (per_rank[0][f"{it}_{layer}"] + per_rank[1][f"{it}_{layer}"]).numpy())
    # every routed token is counted top_k times
    assert got.steps.sum() == sum(int(v.sum()) for r in per_rank.values() for v in r.values())


def test_read_trace_windows_and_layer_ids(dump):
    d, _ = dump
    steps = read_tensorrt_llm(d).steps
    assert np.array_equal(read_trace(d), steps.sum(axis=0, keepdims=True))
    assert np.array_equal(read_trace(d, window=2), steps.reshape(3, 2, len(LAYERS), E).sum(axis=1))
    assert np.array_equal(eplb_opt.read_trace(str(d), window=1), steps)
    assert trace_layer_ids(d) == LAYERS
    assert trace_layer_ids(d / "rank0.safetensors") is None


def test_raw_and_extra_files_are_left_out(dump):
    d, _ = dump
    before = read_trace(d, window=1)
    safetensors.torch.save_file({"100_3": torch.zeros(7, 2, dtype=torch.int32)}, str(d / "rank0_raw.safetensors"))
    (d / "rank0_numtokens.json").write_text("{}")
    assert np.array_equal(read_trace(d, window=1), before)


def test_one_rank_file_points_to_its_directory(dump):
    d, _ = dump
    with pytest.raises(TraceError, match=r"one rank's TensorRT-LLM expert statistic \(18 tensors.*pass its directory"):
        read_trace(d / "rank0.safetensors")


def test_ranks_with_pipeline_stages_may_hold_different_layers(tmp_path):
    d = tmp_path / "pp"
    write_dump(d / "a", ranks=1, layers=[3, 4])
    write_dump(d / "b", ranks=1, layers=[5, 6], seed=1)
    d.joinpath("meta_info.json").write_text((d / "a" / "meta_info.json").read_text())
    (d / "a" / "rank0.safetensors").rename(d / "rank0.safetensors")
    (d / "b" / "rank0.safetensors").rename(d / "rank1.safetensors")
    got = read_tensorrt_llm(d)
    assert got.layer_ids == [3, 4, 5, 6] and got.steps.shape == (len(ITERS), 4, E)


def _write(d: Path, rank: int, records: dict) -> None:
    safetensors.torch.save_file(records, str(d / f"rank{rank}.safetensors"))


def _counts(n=E):
    return torch.arange(n, dtype=torch.int64)


@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda d: (d / "meta_info.json").unlink(), r"no meta_info\.json beside the rank\*\.safetensors"),
        (lambda d: (d / "meta_info.json").write_text("null"), r"meta_info\.json: holds null: rank 0 recorded no tokens"),
        (lambda d: (d / "meta_info.json").write_text("{oops"), r"meta_info\.json: not a readable JSON file"),
        (lambda d: (d / "meta_info.json").write_text('{"num_experts": "16"}'),
         r"meta_info\.json: num_experts must be a positive integer, got '16'"),
        (lambda d: (d / "meta_info.json").write_text('{"num_experts": 32, "num_experts_per_token": 2}'),
         r"rank0\.safetensors: tensor '100_3' has shape \[16\], expected \[32\] \(num_experts in meta_info\.json\)"),
        (lambda d: (d / "rank1.safetensors").rename(d / "rank2.safetensors"),
         r"rank1\.safetensors missing \(found ranks \[0, 2\]\)"),
        (lambda d: _write(d, 1, {"100_3": _counts(), "100_4": _counts(), "100_5": _counts(E + 4)}),
         r"rank1\.safetensors: tensor '100_5' has shape \[20\], expected \[16\]"),
        (lambda d: _write(d, 1, {"100_3": torch.zeros(2, E, dtype=torch.int64)}),
         r"rank1\.safetensors: tensor '100_3' has shape \[2, 16\]"),
        (lambda d: _write(d, 1, {"layer3": _counts()}), r"rank1\.safetensors: tensor 'layer3' is not named <iteration>_<layer>"),
        (lambda d: _write(d, 1, {"100_3": -_counts()}), r"rank1\.safetensors: tensor '100_3': counts must be finite"),
        (lambda d: _write(d, 1, {f"{it}_{l}": _counts() for it in range(300, 306) for l in LAYERS}),
         r"iterations 106\.\.299 are missing between 100 and 305 \(rank files from different runs\?\)"),
        (lambda d: _write(d, 1, {f"{it}_{l}": _counts() for it in range(100, 104) for l in LAYERS}),
         r"rank1\.safetensors: records iterations 100\.\.103, the other ranks 100\.\.105"),
        (lambda d: _write(d, 1, {f"{it}_{l}": _counts() for it in (100, 101) for l in (7,)} |
                         {f"{it}_{l}": _counts() for it in ITERS for l in LAYERS}),
         r"no rank recorded 102_7, 103_7, 104_7, 105_7 \(4 of 24 iteration/layer records missing\)"),
        (lambda d: (d / "rank1.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage"),
         r"rank1\.safetensors: not a readable safetensors file"),
        (lambda d: (d / "rank01.safetensors").write_bytes((d / "rank1.safetensors").read_bytes()),
         r"rank01\.safetensors and rank1\.safetensors are both rank 1"),
    ],
)
def test_bad_dumps_name_the_file_and_the_problem(dump, breakage, match):
    d, _ = dump
    breakage(d)
    with pytest.raises(TraceError, match=match):
        read_trace(d)
    with pytest.raises(TraceError, match=match):
        read_tensorrt_llm(d)


def test_empty_and_meta_only_dumps(tmp_path):
    (tmp_path / "meta_info.json").write_text('{"num_experts": 16, "num_experts_per_token": 2}')
    with pytest.raises(TraceError, match=r"no rank<r>\.safetensors files beside meta_info\.json"):
        read_trace(tmp_path)
    _write(tmp_path, 0, {})
    with pytest.raises(TraceError, match="the rank files hold no records"):
        read_trace(tmp_path)
    with pytest.raises(TraceError, match="is a directory"):
        read_tensorrt_llm(tmp_path / "rank0.safetensors")
    with pytest.raises(TraceError, match="no such file"):
        read_tensorrt_llm(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TraceError, match=r"no \*\.pt files .* no meta_info\.json / rank\*\.safetensors"):
        read_trace(empty)


# --- writing TensorRT-LLM's load-balancer YAML ------------------------------------------------


@pytest.fixture(scope="module")
def planned():
    w = np.random.default_rng(3).gamma(0.7, 100.0, size=(3, E))
    return w, eplb_opt.solve(w, num_replicas=R, num_gpus=G)


def test_export_is_what_tensorrt_llm_loads(tmp_path, planned):
    _, r = planned
    p2l = r.plan.phy2log.numpy()
    path = export_tensorrt_llm(r.plan, tmp_path / "moe_load_balancer.yaml", first_layer=3)
    doc = trtllm_read_load_balancer(path, ep_size=G, num_experts=E, moe_layers=[3, 4, 5])
    assert doc["num_slots"] == R and doc["layer_updates_per_iter"] == 0
    assert {k: v for k, v in doc["initial_global_assignments"].items()} == {3 + l: p2l[l].tolist() for l in range(3)}
    igs, scalars = parse_yaml_by_hand(path)
    assert igs == {3 + l: p2l[l].tolist() for l in range(3)} and scalars == {"num_slots": R, "layer_updates_per_iter": 0}
    assert f"serve with ep_size {G}" in path.read_text().splitlines()[1]
    with pytest.raises(KeyError, match="layer_idx 6 not found"):     # a model layer the file lacks
        trtllm_read_load_balancer(path, ep_size=G, num_experts=E, moe_layers=[3, 4, 5, 6])
    with pytest.raises(AssertionError):                                # 20 slots do not split over 8 ranks
        trtllm_read_load_balancer(path, ep_size=8, num_experts=E, moe_layers=[3])


def test_export_layer_ids_and_updates(tmp_path, planned):
    _, r = planned
    path = export_tensorrt_llm(r.plan, tmp_path / "m.yml", layer_ids=[1, 3, 5], layer_updates_per_iter=2)
    igs, scalars = parse_yaml_by_hand(path)
    assert sorted(igs) == [1, 3, 5] and scalars["layer_updates_per_iter"] == 2
    assert igs[5] == r.plan.phy2log.numpy()[2].tolist()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(first_layer=-1), PlanFileError, r"first_layer must be >= 0, got -1"),
        (dict(first_layer=2.0), InvalidTypeError, r"first_layer must be an integer, got 2\.0"),
        (dict(first_layer=True), InvalidTypeError, r"first_layer must be an integer, got True"),
        (dict(layer_ids=[1, 2]), PlanFileError, r"layer_ids has 2 entries, the plan has 3 layers"),
        (dict(layer_ids=[1, 2, 1]), PlanFileError, r"layer_ids must be distinct .* \[1\] repeat"),
        (dict(layer_ids=[1, "2", 3]), InvalidTypeError, r"layer_ids\[1\] must be an integer, got '2'"),
        (dict(layer_ids=[1, -2, 3]), PlanFileError, r"layer_ids\[1\] must be >= 0, got -2"),
        (dict(layer_ids="123"), InvalidTypeError, r"layer_ids must be a list of integers"),
        (dict(layer_updates_per_iter=-1), PlanFileError, r"layer_updates_per_iter must be >= 0, got -1"),
    ],
)
def test_export_bad_arguments(tmp_path, planned, kwargs, exc, match):
    _, r = planned
    with pytest.raises(exc, match=match):
        export_tensorrt_llm(r.plan, tmp_path / "x.yaml", **kwargs)
    assert not (tmp_path / "x.yaml").exists()


def test_masked_plan_is_refused_naming_layer_and_gpu(tmp_path, planned):
    w, _ = planned
    r = eplb_opt.solve(w, num_replicas=24, num_gpus=G, masked_gpus=[2])     # 6 slots per GPU
    assert (r.plan.phy2log.numpy() == -1).any()
    with pytest.raises(PlanFileError, match=r"masked GPUs \(empty slots, -1\) - layer 0 \(model layer 3\): GPU 2; "
                                            r"layer 1 \(model layer 4\): GPU 2; layer 2 \(model layer 5\): GPU 2\. "
                                            r"TensorRT-LLM's load balancer needs an expert in every slot"):
        export_tensorrt_llm(r.plan, tmp_path / "m.yaml", first_layer=3)
    assert not (tmp_path / "m.yaml").exists()
    # The same from a plan file read back (metadata carries num_gpus), and one without metadata.
    back = Plan.load(r.plan.save(tmp_path / "masked.json"))
    with pytest.raises(PlanFileError, match=r"layer 0 \(model layer 0\): GPU 2;"):
        export_tensorrt_llm(back, tmp_path / "m.yaml")
    bare = Plan.from_numpy(r.plan.phy2log.numpy(), E)
    with pytest.raises(PlanFileError, match=r"layer 0 \(model layer 0\): slots 12, 13, 14, 15, 16, 17;"):
        export_tensorrt_llm(bare, tmp_path / "m.yaml")


def test_plan_missing_an_expert_is_refused(tmp_path, planned):
    _, r = planned
    p2l = r.plan.phy2log.numpy().copy()
    p2l[1][p2l[1] == 7] = 0
    with pytest.raises(PlanFileError, match=r"layer 1 \(model layer 1\) gives no slot to expert 7"):
        export_tensorrt_llm(Plan.from_numpy(p2l, E), tmp_path / "m.yaml")


# --- the CLI both ways -------------------------------------------------------------------


def test_cli_plan_from_dump_to_yaml(tmp_path, dump, capsys):
    d, _ = dump
    out = tmp_path / "moe_load_balancer.yaml"
    assert main(["plan", str(d), *TOPO, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (TensorRT-LLM load balancer: model layers 3..5, num_slots {R}; serve with ep_size {G})" in text
    ref = eplb_opt.solve(read_trace(d)[0], num_replicas=R, num_gpus=G)
    doc = trtllm_read_load_balancer(out, ep_size=G, num_experts=E, moe_layers=LAYERS)
    assert doc["initial_global_assignments"] == {l: ref.plan.phy2log.numpy()[i].tolist() for i, l in enumerate(LAYERS)}
    # --first-layer agreeing with the dump is fine; --json names the format and layers
    assert main(["plan", str(d), *TOPO, "-o", str(out), "--first-layer", "3", "--overwrite", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tensorrt-llm" and info["layer_ids"] == LAYERS
    # the dump also plans into an ordinary plan file
    assert main(["plan", str(d), *TOPO, "-o", str(tmp_path / "p.json")]) == 0
    assert np.array_equal(Plan.load(tmp_path / "p.json").phy2log.numpy(), ref.plan.phy2log.numpy())


def test_cli_yaml_from_a_plain_trace_uses_first_layer(tmp_path, capsys):
    steps = np.random.default_rng(1).integers(0, 50, size=(4, 2, E)).astype(np.float64)
    np.save(tmp_path / "steps.npy", steps)
    out = tmp_path / "m.yml"
    assert main(["plan", str(tmp_path / "steps.npy"), *TOPO, "-o", str(out), "--first-layer", "3"]) == 0
    igs, scalars = parse_yaml_by_hand(out)
    ref = eplb_opt.solve(steps.sum(axis=0), num_replicas=R, num_gpus=G)
    assert igs == {3: ref.plan.phy2log.numpy()[0].tolist(), 4: ref.plan.phy2log.numpy()[1].tolist()}
    assert scalars["num_slots"] == R
    assert main(["plan", str(tmp_path / "steps.npy"), *TOPO, "-o", str(out), "--overwrite"]) == 0
    assert sorted(parse_yaml_by_hand(out)[0]) == [0, 1]                 # default: first layer 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, output, match",
    [
        (["--first-layer", "3"], "p.json", r"--first-layer applies to a TensorRT-LLM output \(-o FILE\.yaml or \.yml\), got -o .*p\.json"),
        (["--first-layer", "-1"], "m.yaml", r"--first-layer must be >= 0, got -1"),
        (["--first-layer", "0"], "m.yaml", r"--first-layer 0 gives model layers 0\.\.2, but the TensorRT-LLM dump .* "
                                           r"recorded layers 3\.\.5 \(3 layers\); leave --first-layer out"),
        (["--masked-gpus", "1"], "m.yaml", r"--masked-gpus leaves empty slots, which TensorRT-LLM's load balancer cannot hold"),
        ([], "m.toml", r"unknown plan file kind '\.toml'.*or \.yaml / \.yml for TensorRT-LLM"),
    ],
)
def test_cli_yaml_usage_errors_exit_2(tmp_path, dump, capsys, extra, output, match):
    d, _ = dump
    out = tmp_path / output
    assert main(["plan", str(d), *TOPO, "-o", str(out), *extra]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_cli_bad_dump_exits_2_naming_the_file(tmp_path, dump, capsys):
    d, _ = dump
    (d / "meta_info.json").unlink()
    assert main(["plan", str(d), *TOPO, "-o", str(tmp_path / "m.yaml")]) == 2
    assert f"{d}: no meta_info.json" in capsys.readouterr().err


def test_cli_first_layer_is_documented():
    from eplb_opt.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command").choices["plan"]
    text = sub.format_help()
    assert "--first-layer N" in text and "DeepSeek-V3" in text and ".yaml" in text


def test_bench_trace_reads_a_dump(tmp_path, monkeypatch, capsys):
    from eplb_opt.bench import runner as bench
    monkeypatch.setattr(bench, "available_peers", lambda: {"_missing": []})
    d = tmp_path / "dump"
    write_dump(d, ranks=2, layers=[1, 2], num_experts=64, top_k=6, iters=range(10, 14))
    out = tmp_path / "bench-out"
    assert main(["bench", "--trace", str(d), "--preset", "deepseek-v2-lite", "--window", "2", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["suite"] == f"trace {d}"
    assert {r["policy"] for r in data["rows"]} == {bench.OURS_H, bench.OURS_E}
    assert all(r["valid"] for r in data["rows"]) and all(r["workload"] == "trace:dump/seed0" for r in data["rows"])
    capsys.readouterr()
