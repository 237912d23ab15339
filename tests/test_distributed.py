"""Exact refinement on Ray: same plan as a local run for deterministic=True, failures
kept local, input errors.  Uses a local Ray instance with 2 CPUs (Ray is in the
``ray`` extra that .ci/run installs)."""

import time

import numpy as np
import pytest

import eplb_opt
from eplb_opt import InvalidProblemError, InvalidTypeError, plan_violations
from eplb_opt.workloads import generate

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _loads(layers=10, seed=0):
    return generate("deepseek-v3-prefill", seed=seed, windows=1)[0][:layers]


@pytest.mark.parametrize("cfg", [
    dict(num_replicas=288, num_gpus=32),                                # global, k = 9
    dict(num_replicas=320, num_gpus=64),                                # global, k = 5
    dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32),     # hierarchical
])
def test_ray_matches_local_when_deterministic(local_ray, cfg):
    w = _loads()
    kw = dict(cfg, mode="exact", time_limit=1.5, deterministic=True, seed=3)
    local = eplb_opt.solve(w, **kw)
    remote = eplb_opt.solve(w, executor="ray", **kw)
    assert np.array_equal(local.plan.phy2log.numpy(), remote.plan.phy2log.numpy())
    assert np.array_equal(local.lower_bound, remote.lower_bound)
    assert local.status == remote.status
    assert any(e.startswith("Ray:") for e in remote.events), remote.events
    assert remote.plan.metadata["parameters"]["executor"] == "ray"
    # The refinement did something, so the comparison is not between two heuristic plans.
    heur = eplb_opt.solve(w, **dict(cfg, mode="heuristic"))
    assert (remote.max_load <= heur.max_load * (1 + 1e-12)).all()
    assert (remote.max_load < heur.max_load * (1 - 1e-9)).any()


def test_ray_wall_clock_mode_is_valid_and_bounded(local_ray):
    w = _loads(seed=1)
    t0 = time.perf_counter()
    r = eplb_opt.solve(w, num_replicas=320, num_gpus=64, mode="exact", time_limit=2.0, executor="ray")
    wall = time.perf_counter() - t0
    assert not plan_violations(r.plan.phy2log.numpy(), w.shape[1], 320, 64)
    assert wall < 2.0 + 3.0, wall          # the budget plus shipping, generously
    heur = eplb_opt.solve(w, num_replicas=320, num_gpus=64)
    assert (r.max_load <= heur.max_load * (1 + 1e-12)).all()


def test_failed_task_keeps_the_heuristic_plan(local_ray):
    from eplb_opt import distributed

    w = _loads(layers=4)
    h = eplb_opt.solve(w, num_replicas=320, num_gpus=64)
    p = h.plan.phy2log.numpy()
    out, stats = distributed.refine(
        w, p, lower_bound=h.lower_bound, tolerance=1e-4, deterministic=True, seconds=1.0, workers=1,
        num_gpus=64, num_nodes=1, budget=1.0, no_such_option=1,     # makes every task raise
    )
    assert np.array_equal(out.phy2log, p)
    assert not out.attempted.any()
    assert any("failed" in e and "kept the heuristic plan" in e for e in out.events), out.events
    assert stats.tasks == []


def test_more_workers_than_cluster_cpus_is_an_error(local_ray):
    with pytest.raises(InvalidProblemError, match="workers=8"):
        eplb_opt.solve(_loads(layers=2), num_replicas=320, num_gpus=64, mode="exact", time_limit=1,
                       executor="ray", workers=8)


def test_executor_default_is_local():
    w = _loads(layers=2)
    a = eplb_opt.solve(w, num_replicas=288, num_gpus=32)
    b = eplb_opt.solve(w, num_replicas=288, num_gpus=32, executor="local")
    assert a.plan.metadata["parameters"]["executor"] == b.plan.metadata["parameters"]["executor"] == "local"
    assert not any("Ray" in e for e in a.events)


def test_heuristic_mode_on_ray_says_it_ran_locally():
    r = eplb_opt.solve(_loads(layers=2), num_replicas=288, num_gpus=32, executor="ray")
    assert any("heuristic mode ran in this process" in e for e in r.events)


@pytest.mark.parametrize("kw, err", [
    (dict(executor="dask"), InvalidProblemError),
    (dict(executor="processes"), InvalidProblemError),
    (dict(ray_address="auto"), InvalidProblemError),                  # needs executor="ray"
    (dict(executor="ray", ray_address=5), InvalidTypeError),
    (dict(executor="ray", ray_address=" "), InvalidTypeError),
])
def test_executor_arguments_are_validated(kw, err):
    with pytest.raises(err, match="executor|ray_address"):
        eplb_opt.solve(_loads(layers=2), num_replicas=288, num_gpus=32, **kw)


def test_ray_worker_dying_mid_solve_keeps_the_heuristic_layers(local_ray, monkeypatch):
    """A Ray worker process that dies (os._exit) loses only its chunk: those layers keep
    the heuristic plan, the event names the crash, the rest is refined."""
    from eplb_opt import distributed

    real = distributed._refine_chunk

    def dying_chunk(w, p, lb, ids, seconds, kw):   # pickled by value into the worker
        import os

        if int(ids[0]) == 0:
            os._exit(1)
        return real(w, p, lb, ids, seconds, kw)

    monkeypatch.setattr(distributed, "_refine_chunk", dying_chunk)
    w = _loads(layers=6, seed=2)
    kw = dict(num_replicas=320, num_gpus=64)
    h = eplb_opt.solve(w, **kw)
    r = eplb_opt.solve(w, **kw, mode="exact", time_limit=3.0, executor="ray", workers=1)
    crashed = [e for e in r.events if "failed" in e and "kept the heuristic plan" in e]
    assert crashed and "layers 0.." in crashed[0], r.events
    assert not plan_violations(r.plan.phy2log.numpy(), w.shape[1], 320, 64)
    assert (r.max_load <= h.max_load * (1 + 1e-12)).all()
    first = np.arange(3)                             # 2 tasks on 2 CPUs: layers 0-2 died
    assert np.array_equal(r.plan.phy2log.numpy()[first], h.plan.phy2log.numpy()[first])
