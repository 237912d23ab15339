"""The compiled kernels' cache and start-up (issue 15), each in fresh processes.

* a first process with an empty ``NUMBA_CACHE_DIR`` compiles, says nothing alarming on
  stderr, and leaves its cache files in that folder (the variable is respected);
* a second process with that cache loads every kernel (``compile_all()``) in well under
  a second of CPU time (CPU, not wall: the machine may be busy with other work), and
  compiles nothing;
* a read-only install (the package tree copied to a folder, ``chmod -R a-w``) plans and
  exits 0: numba falls back to its user cache folder (``$XDG_CACHE_HOME/numba``), or
  writes to ``NUMBA_CACHE_DIR`` when that is set.  When the tests run as root, the child
  runs without ``CAP_DAC_OVERRIDE`` (so the permission bits bind it, as they bind a user);
  the child checks that it really cannot write into the package;
* after ``eplb_opt.warm_up()``, planning with every policy and feature compiles nothing
  more: the ``.signatures`` of every numba dispatcher in an ``eplb_opt`` module are the
  same before and after; and in the cold process, none was left uncompiled.

A cold compile of every kernel costs tens of seconds on 2 cores, once per module run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# compile_all() from a warm cache, timed: CPU seconds of this process (what loading
# costs, whatever else the machine runs), then wall seconds.
WARM_TIMING = """
import time
import eplb_opt.heuristics.compile as c
t, u = time.perf_counter(), time.process_time()
c.compile_all()
print(time.process_time() - u, time.perf_counter() - t)
"""

# The kernels of every loaded eplb_opt module: {module.function: [signatures]}, none
# for a kernel whose dispatcher was never built (LazyKernel: nothing called it).
SIGNATURES = """
import sys
from eplb_opt.heuristics.compile import LazyKernel

def kernels():
    for name, mod in list(sys.modules.items()):
        if name.startswith("eplb_opt") and mod is not None:
            for obj in list(vars(mod).values()):
                if isinstance(obj, LazyKernel) and obj.py_func.__module__ == name:
                    yield name, obj

def signatures():
    out = {}
    for _, obj in kernels():
        key = obj.py_func.__module__ + "." + obj.py_func.__qualname__
        out[key] = sorted(str(s) for s in obj.dispatcher.signatures) if obj.built else []
    return out
"""

# What a fresh install does first: a plan through the public API.  Then warm_up's
# kernels (so the cache holds every kernel for the later processes), and the kernels
# that compile_all() left uncompiled (in a cold process a kernel called only by other
# kernels compiles with them; from a warm cache only its callers load).
FIRST_CALLS = SIGNATURES + """
import json
import numpy as np
import eplb_opt
from eplb_opt.heuristics.compile import compile_all
w = np.random.default_rng(0).gamma(1.0, 100.0, size=(4, 16))
eplb_opt.rebalance_experts(w, 24, 4, 2, 8)
eplb_opt.solve(w, num_replicas=24, num_groups=4, num_nodes=2, num_gpus=8).plan.log2phy
compile_all()
print(json.dumps(sorted(k for k, v in signatures().items() if not v)))
"""

# A read-only install plans and exits 0; it first checks that it cannot write there.
READ_ONLY = """
import os, sys
import numpy as np
import eplb_opt
pkg = os.path.dirname(eplb_opt.__file__)
assert pkg.startswith(sys.argv[1]), pkg
try:
    open(os.path.join(pkg, "probe"), "w")
    sys.exit("the install folder is writable: the test would prove nothing")
except PermissionError:
    pass
# One compiled kernel (the verifier's maps) is enough to show where the cache goes; the
# whole pipeline would only repeat the cold compile the `cold` fixture already times.
from eplb_opt.plan import derive_maps
phy2log = np.tile(np.arange(24) % 16, (4, 1))
log2phy, logcnt = derive_maps(phy2log, 16)
assert logcnt.sum() == 4 * 24 and log2phy.shape == (4, 16, 9)
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without numba/eplb settings or PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "EPLB_OPT_")) and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str], *args: str, cwd: Path | None = None,
         preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=900, preexec_fn=preexec)


def _cache_files(folder: Path) -> dict[str, float]:
    """Numba cache files (index ``.nbi`` and data ``.nbc``) under ``folder``, with mtimes."""
    return {str(f.relative_to(folder)): f.stat().st_mtime for f in folder.rglob("*") if f.suffix in (".nbi", ".nbc")}


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """``(cache folder, completed process)``: the first calls of a fresh install, with
    ``NUMBA_CACHE_DIR`` an empty folder."""
    cache = tmp_path_factory.mktemp("numba-cache")
    done = _run(FIRST_CALLS, _env(NUMBA_CACHE_DIR=str(cache)))
    assert done.returncode == 0, done.stderr
    return cache, done


def test_first_call_says_nothing_alarming(cold):
    _, done = cold
    text = done.stderr.lower()
    assert "warn" not in text and "traceback" not in text and "error" not in text, done.stderr


def test_numba_cache_dir_is_respected(cold):
    cache, _ = cold
    names = list(_cache_files(cache))
    assert any(n.endswith(".nbi") for n in names) and any(n.endswith(".nbc") for n in names), names
    # the verifier's kernels and the heuristics' kernels both cached there
    assert any("verify_kernels." in n for n in names), names
    assert any("heuristics" in n for n in names), names


def test_warm_cache_loads_every_kernel_without_compiling(cold):
    """Every kernel loads from a warm cache: no cache file is written and the CPU time is
    that of loading (compile_all() from a warm cache: 0.57-0.73 s CPU on an idle 2-core
    machine; compiling them takes about 130 s).  The bound is loose on purpose: under
    CI's four test workers on two cores the same load measured 1.00 s CPU, and the
    sub-second figure itself is a benchmark's (``benchmarks/run_kernels.py``, cold start),
    not a timed unit test's."""
    cache, _ = cold
    before = _cache_files(cache)
    done = _run(WARM_TIMING, _env(NUMBA_CACHE_DIR=str(cache)))
    assert done.returncode == 0, done.stderr
    assert _cache_files(cache) == before            # loaded, nothing compiled or rewritten
    cpu, wall = (float(x) for x in done.stdout.split()[-2:])
    assert cpu < 10.0, f"compile_all() from a warm cache: {cpu:.2f} s CPU, {wall:.2f} s wall"


# A fresh process with a warm cache: the first prefill rebalance_experts, then what the
# loading did.  numba's own cache loader refreshes the target context first, importing
# every lowering registry (numba.typed.typedlist among them); KernelCache does not.
FAST_LOAD = SIGNATURES + """
import hashlib, json, sys
import numpy as np
import numba
import eplb_opt
from numba.core.runtime import rtsys
from eplb_opt.heuristics.compile import KernelCache
from eplb_opt.workloads import generate
w = generate("deepseek-v3-prefill", windows=1, seed=0)[0]
phy2log, log2phy, logcnt = eplb_opt.rebalance_experts(w, 288, 8, 4, 32)
registry_loaded = "numba.typed.typedlist" in sys.modules
# numba modules that only compiling needs: the environments of numpy's max/argmax and of
# array expressions would import the first two (the kernels take maxima by loops; see
# heuristics/packing.py), numba's rebuild of any kernel's environments the last two
numba_extra = sorted(m for m in ("numba.np.arraymath", "numba.np.npyimpl", "numba.np.arrayobj",
                                 "numba.cpython.unicode") if m in sys.modules)
nrt = [type(rtsys.library).__name__, getattr(rtsys.library, "bitcode_parsed", None)]      # before any compile
hits = 0
caches = set()
libraries = {}
built = 0
for name, obj in list(kernels()):
    if obj.built:
        built += 1
        caches.add(type(obj._cache).__name__)
        hits += sum(obj.stats.cache_hits.values())
        assert not obj.stats.cache_misses, (name, obj.stats)
        for cres in obj.overloads.values():
            lib = cres.library
            libraries[obj.py_func.__name__] = [type(lib).__name__, getattr(lib, "bitcode_parsed", True)]
unbuilt = sum(1 for _ in kernels()) - built
# A kernel compiled now that calls a cached kernel (loaded from the cache while this one
# compiles): the cached kernel's bitcode is parsed then, to link it in.
from eplb_opt.heuristics.local import next_values
@numba.njit
def calls_cached(w, c):
    return next_values(w, c).sum()
assert calls_cached(np.array([6.0, 4.0]), np.array([1, 3])) == 3.0 + 1.0
linked = [type(lib).__name__ for lib in (c.library for c in next_values.overloads.values())]
linked_parsed = all(getattr(c.library, "bitcode_parsed", False) for c in next_values.overloads.values())
# A kernel compiled after the fast loads (numba's compiler refreshes the registries itself)
@numba.njit
def fresh(a):
    l = numba.typed.List()
    for x in np.sort(a)[::-1]:
        l.append(x * 2.0)
    return l[0] + np.sqrt(a).sum()
a = np.array([4.0, 1.0, 9.0])
assert fresh(a) == 18.0 + 6.0
nrt.append(getattr(rtsys.library, "bitcode_parsed", None))                            # linked into those compiles
print(json.dumps({"registry_loaded": registry_loaded, "caches": sorted(caches), "hits": hits,
                  "libraries": libraries, "linked": linked, "linked_parsed": linked_parsed,
                  "numba_extra": numba_extra, "nrt": nrt, "unbuilt": unbuilt,
                  "plan": hashlib.sha256(phy2log.numpy().tobytes() + log2phy.numpy().tobytes()).hexdigest()}))
"""


def test_warm_cache_loads_without_the_registry_refresh(cold):
    """The kernels load through :class:`KernelCache` (the first prefill call imports none of
    numba's lowering registries), from the cache, as :class:`LazyLinkLibrary` libraries
    whose bitcode is not parsed, with the same plan as this process; kernels compiled
    afterwards in that process still work, one of them calling a cached kernel (whose
    bitcode it then parses to link it), the other needing the modules the loads skipped;
    nor does it import numba's ``arraymath`` or ``npyimpl`` (the maxima are loops), nor
    ``arrayobj`` or ``unicode`` (the environments' modules: ``_quiet_env``).  numba's
    runtime library comes from the cache too (``initialize_nrt``: a ``LazyLinkLibrary``,
    which the later compile parses to link), and only the kernels the call used have
    dispatchers (``LazyKernel``).  Fails with numba's own ``FunctionCache`` (its refresh
    imports ``numba.typed.typedlist``; its libraries are ``JITCodeLibrary``), with numba's
    eager ``_unserialize`` (parsed), with numba's ``_rebuild_env`` (imports ``arrayobj``)
    and with numba's ``rtsys.initialize`` (a ``JITCodeLibrary``)."""
    import hashlib

    import eplb_opt
    from eplb_opt.workloads import generate

    cache, _ = cold
    before = _cache_files(cache)
    done = _run(FAST_LOAD, _env(NUMBA_CACHE_DIR=str(cache)))
    assert done.returncode == 0, done.stderr
    assert _cache_files(cache) == before            # loaded, nothing compiled into our cache
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["caches"] == ["KernelCache"], got
    assert got["hits"] > 0 and not got["registry_loaded"] and got["numba_extra"] == [], got
    assert got["nrt"] == ["LazyLinkLibrary", False, True], got   # loaded, then parsed to link a compile
    assert got["unbuilt"] > 20, got                         # kernels only other kernels call
    # loaded without parsing their linking bitcode (LazyLinkLibrary) ...
    assert got["libraries"] and all(v == ["LazyLinkLibrary", False] for v in got["libraries"].values()), got
    # ... which a kernel compiled later parses, and links, to call one of them
    assert got["linked"] == ["LazyLinkLibrary"] and got["linked_parsed"], got
    p, m, _ = eplb_opt.rebalance_experts(generate("deepseek-v3-prefill", windows=1, seed=0)[0], 288, 8, 4, 32)
    assert got["plan"] == hashlib.sha256(p.numpy().tobytes() + m.numpy().tobytes()).hexdigest()


def _without_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_FOWNER from the bounding
    set, so a root child obeys permission bits after exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 3):                               # CAP_DAC_OVERRIDE, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:        # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only_install(tmp_path):
    """A folder holding the package tree as installed (``eplb_opt`` with
    ``eplb_opt/heuristics``), with every write bit cleared."""
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "eplb_opt", site / "eplb_opt", ignore=ignore)
    shutil.copytree(ROOT / "heuristics", site / "eplb_opt" / "heuristics", ignore=ignore, dirs_exist_ok=True)
    for path in [site, *site.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield site
    for path in [site, *site.rglob("*")]:            # so that pytest can remove it
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("own_cache_dir", [False, True], ids=["user-cache-fallback", "NUMBA_CACHE_DIR"])
def test_read_only_install_compiles_into_a_user_cache(read_only_install, tmp_path, own_cache_dir):
    site = read_only_install
    xdg, mine = tmp_path / "xdg", tmp_path / "numba-cache"
    xdg.mkdir(), mine.mkdir()
    extra = {"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(xdg), "HOME": str(tmp_path)}
    if own_cache_dir:
        extra["NUMBA_CACHE_DIR"] = str(mine)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    done = _run(READ_ONLY, _env(**extra), str(site), cwd=tmp_path, preexec=preexec)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _cache_files(site)                    # nothing was written into the install
    used, unused = (mine, xdg) if own_cache_dir else (xdg / "numba", mine)
    assert any("verify_kernels." in n for n in _cache_files(used)), list(_cache_files(used))
    assert not _cache_files(unused)


# After warm_up(): every eplb_opt dispatcher's signatures, the planning calls, again.
NOTHING_NEW = SIGNATURES + """
import json
import numpy as np
import torch
import eplb_opt
from eplb_opt.workloads import generate

eplb_opt.warm_up()
before = signatures()
""" + """
rng = np.random.default_rng(0)
small = dict(num_replicas=24, num_groups=4, num_nodes=2, num_gpus=8)
w = rng.gamma(1.0, 100.0, size=(3, 4, 16))
big = generate("deepseek-v3-prefill", windows=2, seed=0)
prefill = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
eplb_opt.rebalance_experts(torch.from_numpy(w[0]).float(), 24, 4, 2, 8)
eplb_opt.rebalance_experts(w[0].round().astype(np.int64), 24, 4, 2, 8)
eplb_opt.rebalance_experts(big[0], 288, 8, 4, 32)
for policy in ("auto", "global", "spill"):
    eplb_opt.solve(w[0], policy=policy, **small).plan.log2phy
for policy in ("auto", "global"):
    eplb_opt.solve(big[0], policy=policy, **prefill)
eplb_opt.solve(w[0], allow_duplicates=False, **small)
eplb_opt.solve(big[0], allow_duplicates=False, **prefill)
prev = eplb_opt.solve(w[0], **small).plan.phy2log.numpy()
eplb_opt.solve(w[1], previous=prev, max_balance_loss=0.005, **small)
prev = eplb_opt.solve(big[0], **prefill).plan.phy2log.numpy()
eplb_opt.solve(big[1], previous=prev, max_balance_loss=0.005, **prefill)
for objective in ("worst", "mean"):
    eplb_opt.solve(w, objective=objective, **small)
def ro(a):
    a = np.array(a)
    a.setflags(write=False)          # e.g. np.load(mmap_mode="r") or a replay trace chunk
    return a
eplb_opt.solve(ro(big[1]), previous=ro(prev), max_balance_loss=0.005, **prefill)
eplb_opt.solve(ro(w[0]), policy="spill", **small)
eplb_opt.solve(ro(w), objective="worst", **small)
eplb_opt.solve(ro(w[2]), history=ro(w[:2]), **small)
eplb_opt.rebalance_experts(ro(big[0]), 288, 8, 4, 32)
r = eplb_opt.solve(w[0], masked_gpus=[1], **small)
p, m, c = r.plan.to_numpy()
mask = np.zeros((4, 8), dtype=bool)
mask[:, 1] = True
assert eplb_opt.plan_violations(p, 16, 24, 8, log2phy=m, logcnt=c, masked=mask) == []
after = signatures()
new = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
print(json.dumps({"new": {k: v for k, v in new.items() if v}, "kernels": len(after)}))
"""


def test_warm_up_compiles_everything(cold):
    cache, first = cold
    uncompiled = json.loads(first.stdout.strip().splitlines()[-1])
    assert uncompiled == [], uncompiled             # neither warm_up nor a first plan compiled these
    done = _run(NOTHING_NEW, _env(NUMBA_CACHE_DIR=str(cache)))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["kernels"] > 0
    assert found["new"] == {}, found               # a planning call compiled (or loaded) a kernel warm_up did not


# A kernel that calls a kernel of another module, cached, in a scratch folder; the
# callee's module then changes.  numba's own check covers only the caller's file.
CALLEE = "import numba\n\n@numba.njit(cache=True)\ndef f():\n    return {value}\n"
CALLER = """
import sys
from pathlib import Path
import numba
from eplb_opt.heuristics.compile import fingerprint, stamped
from callee import f

here = Path(__file__).resolve().parent

def plain():
    return f()

def fresh():
    return f()

plain = numba.njit(cache=True)(plain)
fresh = stamped(numba.njit(cache=True)(fresh), fingerprint([here / "callee.py", here / "caller.py"]))
print(plain(), fresh())
"""


def test_a_cached_kernel_sees_its_callees_changes(tmp_path):
    (tmp_path / "caller.py").write_text(CALLER)
    outputs = []
    for value in (1, 22):
        (tmp_path / "callee.py").write_text(CALLEE.format(value=value))
        done = subprocess.run([sys.executable, str(tmp_path / "caller.py")], capture_output=True, text=True,
                              env=_env(), cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs[0] == ["1", "1"]
    # outputs[1][0] is numba's plain cache: "1" (stale machine code) in numba 0.65-0.68
    assert outputs[1][1] == "22", outputs          # the stamped kernel recompiled against the new callee


def test_every_kernel_is_stamped_with_every_kernel_source():
    import eplb_opt  # noqa: F401  (imports every kernel module)

    from eplb_opt.heuristics import compile as comp

    names = {f.name for f in comp.kernel_sources()}
    assert {"packing.py", "pipeline.py", "apportion.py", "local.py", "spill.py", "verify_kernels.py",
            "metrics.py", "bounds.py"} <= names, names
    stamp = comp.sources_fingerprint()
    found = 0
    for name, mod in list(sys.modules.items()):
        if name.startswith("eplb_opt") and mod is not None:
            for obj in list(vars(mod).values()):
                if isinstance(obj, comp.LazyKernel) and obj.py_func.__module__ == name:
                    assert obj.dispatcher._cache._cache_file._source_stamp[1] == stamp, name
                    found += 1
    assert found > 20


# numba's runtime library (initialize_nrt) from a cache file in a scratch folder: which
# library class the process ended with (JITCodeLibrary: compiled here; LazyLinkLibrary:
# loaded), then the verifier's maps through a cached kernel that uses the runtime.
NRT_LOAD = """
import sys
import numpy as np
import eplb_opt.heuristics.compile as c
c._nrt_folder = lambda: sys.argv[1]
from numba.core.runtime import rtsys
from eplb_opt.plan import derive_maps
phy2log = np.tile(np.arange(24) % 16, (4, 1))
log2phy, logcnt = derive_maps(phy2log, 16)
assert logcnt.sum() == 4 * 24
print(type(rtsys.library).__name__)
"""


def test_runtime_library_is_cached_and_replaced_when_stale(tmp_path):
    """The first process compiles numba's runtime library and caches it; the next loads
    it; a file that is unreadable, or written under another key (numba, llvmlite, CPU,
    settings), is compiled again and replaced, and the process still plans."""
    import pickle

    from eplb_opt.heuristics import compile as comp

    path = tmp_path / comp._NRT_FILE

    def run() -> str:
        done = _run(NRT_LOAD, _env(), str(tmp_path))
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1]

    path.write_bytes(b"not a pickle")
    assert run() == "JITCodeLibrary"
    key, state = pickle.loads(path.read_bytes())
    assert run() == "LazyLinkLibrary"
    path.write_bytes(pickle.dumps((("another numba",) + key[1:], state)))
    assert run() == "JITCodeLibrary"
    assert pickle.loads(path.read_bytes())[0] == key
    assert run() == "LazyLinkLibrary"


def test_a_dispatcher_that_fails_to_build_says_so(monkeypatch):
    """An ``AttributeError`` while a :class:`LazyKernel` builds its dispatcher (numba 0.65
    lacks a setting 0.68 has, say) is a ``RuntimeError`` naming the kernel, not an endless
    recursion through ``__getattr__`` (what a property that raises ``AttributeError``
    falls into)."""
    from eplb_opt.heuristics import compile as comp

    def broken(fn):
        raise AttributeError("module 'numba.config' has no attribute 'SOMETHING'")

    monkeypatch.setattr(comp, "_dispatcher", broken)

    def plus_one(x):
        return x + 1

    k = comp.LazyKernel(plus_one)
    with pytest.raises(RuntimeError, match="plus_one.*SOMETHING"):
        k(1)
    assert not k.built
