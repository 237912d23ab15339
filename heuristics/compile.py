"""How the heuristics' hot loops are compiled: one decorator, one set of options.

Every kernel in ``eplb_opt.heuristics`` (and the migration, spill and window searches
built on it) is a plain Python function over numpy arrays and scalars, compiled by
:func:`kernel` with numba:

* ``cache=True``: machine code is written next to the module, or -- on a read-only
  install -- to numba's user cache directory (``NUMBA_CACHE_DIR`` overrides both), so a
  fresh process loads it instead of compiling (well under a second);
* ``nogil=True``: a kernel releases the GIL, so a server's other threads keep running;
* no ``fastmath`` and no parallel reductions: every sum runs in a fixed order, so a
  plan is the same bit for bit on every rank, whatever its thread count or CPU;
* a cached kernel is valid only for the sources it was compiled from, **all** of them:
  numba checks only the file that defines a kernel, so a kernel that calls kernels of
  other modules (``pipeline`` calls ``packing`` and ``apportion``) kept running their
  old machine code after only those files changed.  :func:`kernel` adds a fingerprint
  of every kernel module's source (:func:`sources_fingerprint`) to each cache index's
  stamp, so a change to any of them recompiles every kernel once;
* ``boundscheck`` stays off (numba's default); kernels index only within the shapes
  their callers checked;
* a cached kernel loads without numba's registry refresh (:class:`KernelCache`): numba's
  own cache calls ``target_context.refresh()`` before every load, which on a process's
  first load imports every lowering registry numba has (typed containers, random,
  linear algebra, ...: 0.15-0.25 s) that only compiling needs -- and numba's compiler
  refreshes by itself before it compiles.  A fresh process's first prefill
  ``rebalance_experts`` went from 0.64-0.80 s to 0.51-0.64 s with it (import included);
* and without parsing its bitcode (:class:`LazyLinkLibrary`): numba caches a kernel's
  machine code together with its LLVM bitcode, which only a kernel compiled later that
  calls it needs (to inline it), yet parses that bitcode and lists its symbols on every
  load (9 kernels, 0.5 MB of bitcode, about 80 ms of a fresh process's first prefill
  ``solve``).  A kernel loaded by :class:`KernelCache` parses it when a compile first
  links it, if ever;
* and without importing the numba modules its environments name (:func:`_quiet_env`:
  ``numba.np.arrayobj`` and ``numba.cpython.unicode``, 50-60 ms);
* numba's runtime library (reference counting, which every kernel links) is cached too
  (:func:`initialize_nrt`), where numba compiles it in every process (35-40 ms);
* a kernel's dispatcher is built when first used (:class:`LazyKernel`): a first call
  builds the few it calls, not all of them (about 35 ms of ``import eplb_opt``).

With the three last, a fresh process's ``import eplb_opt`` plus its first prefill
``rebalance_experts`` went from about 220 ms to about 120 ms beyond ``import numba``
(benchmarks/run_kernels.py, cold start).

:func:`compile_all` compiles every kernel up front on small inputs
(``eplb_opt.warm_up()`` calls it), so a serving engine pays the compile time, once, at
start-up rather than on its first rebalance.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import pickle
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import llvmlite
import llvmlite.binding as ll
import numba
import numpy as np
from numba.core import environment
from numba.core.caching import CompileResultCacheImpl, FunctionCache, IndexDataCacheFile
from numba.core.codegen import JITCodeLibrary
from numba.core.compiler_lock import global_compiler_lock
from numba.core.runtime import _nrt_python as _nrt
from numba.core.runtime import nrtdynmod, rtsys

__all__ = ["kernel", "warmer", "compile_all", "writable", "sources_fingerprint", "NUMBA_VERSION", "KernelCache",
           "LazyLinkLibrary", "LazyKernel", "initialize_nrt", "frozen_copy"]

NUMBA_VERSION = numba.__version__

# Functions that call the kernels on small inputs of every type they are used with.
_WARMERS: list[Callable[[], Any]] = []


def kernel_sources() -> list[Path]:
    """The source files of every module that defines kernels, in a fixed order: this
    package's modules and the ``eplb_opt`` modules that import :func:`kernel`."""
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    spec = importlib.util.find_spec("eplb_opt")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for f in sorted(Path(folder).glob("*.py")):
            if "heuristics.compile import kernel" in f.read_text(encoding="utf-8"):
                files.append(f.resolve())
    return files


def fingerprint(files: Iterable[Path]) -> str:
    """sha256 over the names and bytes of ``files``, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def sources_fingerprint() -> str:
    """:func:`fingerprint` of :func:`kernel_sources`, once per process."""
    return fingerprint(kernel_sources())


def stamped(dispatcher: Any, stamp: str) -> Any:
    """Add ``stamp`` to the freshness stamp of ``dispatcher``'s on-disk cache index, so
    an index written under another stamp is treated as stale and recompiled (numba's
    own stamp covers only the defining file).  Uses numba's cache internals
    (``Dispatcher._cache._cache_file._source_stamp``), the same from numba 0.65 to 0.68;
    a numba without them fails loudly here rather than running stale machine code."""
    index = dispatcher._cache._cache_file
    index._source_stamp = (index._source_stamp, stamp)
    return dispatcher


class LazyLinkLibrary(JITCodeLibrary):
    """The code library of a kernel loaded from the cache (numba's ``JITCodeLibrary``,
    the CPU target's), whose bitcode for linking is parsed on first use.

    numba's loader (``CPUCodeLibrary._unserialize``, kind ``"object"``) hands the cached
    object code to the execution engine, parses the cached bitcode into
    ``_shared_module`` and adds every function it defines to the engine's symbol list.
    Only two things read those: ``_get_module_for_linking`` (a kernel compiled later
    that calls this one links that module) and ``get_pointer_to_function`` (which
    returns 0 for a name not on the list).  Here ``_shared_module`` is parsed, and its
    symbols listed, the first time it is read; and a pointer is looked up without
    parsing where the name is one the object code holds and the engine resolves, which
    numba asks for once per load (the kernel's CPython wrapper).  Any other name parses
    first and answers as numba does.  The machine code is the same either way."""

    _bitcode: bytes | None = None
    _object: bytes = b""

    @classmethod
    def _unserialize(cls, codegen: Any, state: Any) -> Any:
        """The library of cached ``state`` (``(name, kind, data)``, what
        ``serialize_using_object_code`` wrote); numba's own loader for other kinds."""
        name, kind, data = state
        if kind != "object":
            return super()._unserialize(codegen, state)
        object_code, bitcode = data
        self = cls(codegen, name)
        self.enable_object_caching()
        self._set_compiled_object(object_code)
        self._bitcode = bitcode
        self._object = object_code         # the engine's loader releases _compiled_object
        self._finalize_final_module()
        return self

    @property
    def _shared_module(self) -> Any:
        mod = self.__dict__.get("_linking_module")
        if mod is None and self._bitcode is not None:
            mod = ll.parse_bitcode(self._bitcode)
            self._codegen._engine._load_defined_symbols(mod)
            self._bitcode = None
            self.__dict__["_linking_module"] = mod
        return mod

    @_shared_module.setter
    def _shared_module(self, mod: Any) -> None:
        self.__dict__["_linking_module"] = mod

    @property
    def bitcode_parsed(self) -> bool:
        """Whether the linking bitcode has been parsed (tests read it)."""
        return self._bitcode is None

    def get_pointer_to_function(self, name: str) -> int:
        engine = self._codegen._engine
        if self._bitcode is not None and not engine.is_symbol_defined(name):
            self._ensure_finalized()
            if name.encode() in self._object:     # named in this object's symbol table
                addr = engine.get_function_address(name)
                if addr:
                    engine._defined_symbols.add(name)
                    self._object = b""            # numba looks up one name per load
                    return addr
            self._shared_module                               # parse: numba's own answer below
        return super().get_pointer_to_function(name)


class _LazyLoad(CompileResultCacheImpl):
    """numba's compile-result cache, its libraries loaded as :class:`LazyLinkLibrary`."""

    def rebuild(self, target_context: Any, payload: Any) -> Any:
        codegen = target_context.codegen()
        with global_compiler_lock:                      # the codegen is shared by every thread
            own = codegen.__dict__.get("_library_class")
            codegen._library_class = LazyLinkLibrary     # what its unserialize_library builds
            try:
                return super().rebuild(target_context, payload)
            finally:
                if own is None:
                    del codegen._library_class
                else:
                    codegen._library_class = own


def _quiet_env(modname: str, consts: Any, env_name: str) -> Any:
    """numba's ``environment._rebuild_env`` (what unpickling a cached kernel's
    environments calls), without importing a numba module to read its globals.

    A kernel's machine code carries one environment per function compiled into it,
    numba's own implementations included (``np.empty``'s lives in ``numba.np.arrayobj``,
    string helpers in ``numba.cpython.unicode``), and numba rebuilds each around its
    module's globals, importing the module: 50-60 ms of a fresh process's first prefill
    call, on modules that only compiling needs.  Only object-mode code reads an
    environment's globals (``pylowering``); nopython code reads its constants, restored
    here as numba restores them.  So an environment of a numba module not yet imported
    gets a globals dict holding only ``__name__`` (what pickling it again reads); any
    other is numba's."""
    env = environment.lookup_environment(env_name)
    if env is not None:
        return env
    if modname in sys.modules or not modname.startswith("numba."):
        return environment._rebuild_env(modname, consts, env_name)
    env = environment.Environment({"__name__": modname})
    env.consts[:] = consts
    env.env_name = env_name
    environment.Environment._memo[env_name] = env
    return env


class _Unpickler(pickle.Unpickler):
    """Reads a cached kernel with :func:`_quiet_env` in place of numba's rebuild."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numba.core.environment" and name == "_rebuild_env":
            return _quiet_env
        return super().find_class(module, name)


class _IndexDataFile(IndexDataCacheFile):
    """numba's index and data files of one kernel, data read by :class:`_Unpickler`."""

    def _load_data(self, name: str) -> Any:
        with open(self._data_path(name), "rb") as f:
            data = f.read()
        return _Unpickler(io.BytesIO(data)).load()


# The NRT library's cache file, in _nrt_folder().
_NRT_FILE = "eplb_opt-nrt.py{0}{1}.nbo".format(*sys.version_info[:2])


def _nrt_key(codegen: Any) -> tuple:
    """What the NRT library's machine code depends on: the numba and llvmlite that built
    it, the CPU (numba's ``magic_tuple``) and the settings ``create_nrt_module`` and the
    optimiser read."""
    config = numba.config
    return (NUMBA_VERSION, llvmlite.__version__, codegen.magic_tuple(), str(config.OPT), config.DEBUG_NRT,
            getattr(config, "DEBUG_NRT_STACK_LIMIT", None), config.MACHINE_BITS)   # the limit: numba >= 0.66


@lru_cache(maxsize=1)
def _nrt_folder() -> str:
    """Where the NRT library is cached: the cache folder numba picks for this module's
    kernels would (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside this file, else the
    user cache folder), one place whichever kernel a process loads first."""
    return _LazyLoad(kernel_sources).locator.get_cache_path()


def initialize_nrt(target_context: Any) -> None:
    """``rtsys.initialize(target_context)`` (numba's runtime, which every kernel links
    against), its library of atomic reference-count functions loaded from the cache
    when a process before this one compiled it there.

    numba compiles that library (a small LLVM module) in every process, on the first
    kernel load: 35-40 ms of a fresh process's first call.  Here its object code is
    cached as a kernel's is (:class:`LazyLinkLibrary`, with its bitcode for kernels
    compiled later that link it) in :func:`_nrt_folder`, keyed by :func:`_nrt_key`; a
    file written by another numba, llvmlite or CPU is compiled again and replaced.  The
    rest is numba's ``initialize``: the C helpers' symbols first, then the library.
    Every kernel's dispatcher calls this when it is built, before numba's compiler or
    cache loader could initialise the runtime their own way."""
    if rtsys._init:
        return
    with global_compiler_lock:
        if rtsys._init:
            return
        if numba.config.NRT_STATS:
            _nrt.memsys_enable_stats()
        for py_name, address in _nrt.c_helpers.items():
            ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)
        codegen = target_context.codegen()
        key = _nrt_key(codegen)
        path = os.path.join(_nrt_folder(), _NRT_FILE)
        library = None
        try:
            with open(path, "rb") as f:
                saved_key, state = pickle.load(f)
            if saved_key == key:
                library = LazyLinkLibrary._unserialize(codegen, state)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
            library = None                                   # absent or unreadable: compile
        if library is None:
            ir_mod, library = nrtdynmod.create_nrt_module(target_context)
            library.enable_object_caching()
            library.add_ir_module(ir_mod)
            library.finalize()
            _save_atomically(path, pickle.dumps((key, library.serialize_using_object_code()), protocol=-1))
        rtsys._library = library
        rtsys._init = True


def _save_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so a
    reader sees the whole file or none; a folder that cannot be written is skipped
    (the library is then compiled again by the next process)."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class KernelCache(FunctionCache):
    """numba's on-disk cache of one kernel (same files, same locations: next to the
    module, else the user cache directory, ``NUMBA_CACHE_DIR`` first), loading without
    the registry refresh numba's ``load_overload`` starts with.

    Loading rebuilds machine code, its environments (which import the modules they
    belong to, numba's own included) and links it against numba's runtime (NRT), which
    is initialised here as the refresh would have done; nothing in it reads a lowering
    or typing registry.  A kernel that is not in the cache is compiled by numba's
    compiler, which refreshes both contexts itself before it compiles.  Uses numba's
    cache internals (``_guard_against_spurious_io_errors``, ``_load_overload``), the same
    from numba 0.65 to 0.68, as :func:`stamped` does; tests/test_kernel_cache.py checks
    that every kernel loads through it from a warm cache."""

    _impl_class = _LazyLoad

    def __init__(self, py_func: Any) -> None:
        super().__init__(py_func)
        self._cache_file = _IndexDataFile(cache_path=self._cache_path, filename_base=self._impl.filename_base,
                                          source_stamp=self._cache_file._source_stamp)

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        initialize_nrt(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None                                   # the guard swallowed an I/O error


def _dispatcher(fn: Callable[..., Any]) -> Any:
    """The numba dispatcher of ``fn`` with the package's options (see module docs): what
    ``numba.njit(cache=True, nogil=True)`` builds, its cache a :class:`KernelCache`."""
    dispatcher = numba.njit(nogil=True, fastmath=False)(fn)
    dispatcher._cache = KernelCache(dispatcher.py_func)   # what Dispatcher.enable_caching() does
    initialize_nrt(dispatcher.targetctx)
    return stamped(dispatcher, sources_fingerprint())


class LazyKernel:
    """A kernel whose numba dispatcher is built on first use.

    A dispatcher costs about 0.5 ms to build (its signature, compiler and cache objects),
    and a fresh process's first call reads only the few kernels it calls from Python: a
    kernel called by another kernel is compiled into its caller's machine code, so a
    caller loaded from the cache never needs its callees' dispatchers.  Building every
    dispatcher at import cost about 35 ms of ``import eplb_opt`` (72 of them).

    Calling it calls the dispatcher; numba types it as that dispatcher
    (``_numba_type_``), so a kernel compiled later that calls it sees the real one; any
    other attribute (``py_func``, ``signatures``, ``stats``, ...) is the dispatcher's."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.py_func = fn
        self._built = None
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__module__ = fn.__module__
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def dispatcher(self) -> Any:
        """The numba dispatcher, built on the first read."""
        built = self._built
        if built is None:
            with global_compiler_lock:     # numba's (reentrant): a compile may build callees
                built = self._built
                if built is None:
                    try:
                        built = self._built = _dispatcher(self.py_func)
                    except AttributeError as e:    # else Python would take it for a missing
                        raise RuntimeError(f"building the dispatcher of {self.__qualname__}: {e}") from e
        return built

    @property
    def built(self) -> bool:
        """Whether the dispatcher has been built (tests read it)."""
        return self._built is not None

    @property
    def _numba_type_(self) -> Any:
        return self.dispatcher._numba_type_

    def __call__(self, *args: Any) -> Any:
        return self.dispatcher(*args)

    def __getattr__(self, name: str) -> Any:
        if name in ("_built", "py_func"):            # not set yet (unpickling, copying)
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def __repr__(self) -> str:
        return f"<kernel {self.__module__}.{self.__qualname__}{'' if self.built else ' (not built)'}>"


def kernel(fn: Callable[..., Any]) -> LazyKernel:
    """Compile ``fn`` with the package's options (see module docs), its dispatcher
    built on first use (:class:`LazyKernel`)."""
    return LazyKernel(fn)


def writable(a: Any) -> Any:
    """``a`` itself when it is writeable; the private array behind it when ``a`` is a
    :func:`frozen_copy`; else a copy.

    numba types a read-only array differently from a writeable one, so passing one to a
    kernel compiles a second specialisation after :func:`compile_all` (seconds, on a
    serving engine's rebalance path).  Entry points pass their array arguments through
    this instead; a copy of loads or maps costs microseconds, and a call's frozen loads
    (``eplb_opt.problem.as_weight``) went through it five times per ``solve``.  Kernels
    read their input arrays and never write them."""
    if a.flags.writeable:
        return a
    base = a.base
    while type(base) is np.ndarray:                 # views of views (``windows[None][0]``)
        base = base.base
    # The owner is C-contiguous: a view with its shape and strides spans all of it, so it
    # starts where it starts (no pointer to compare; ``.ctypes`` builds an object).
    if type(base) is _FrozenBase and base.shape == a.shape and base.strides == a.strides:
        return base.view(np.ndarray)
    return a.copy()


class _FrozenBase(np.ndarray):
    """The private array behind a :func:`frozen_copy` (a marker subclass: only arrays
    made by it are handed back by :func:`writable`)."""


def frozen_copy(a: Any) -> tuple[Any, bool]:
    """``(copy, plain)``: a read-only C-contiguous float64 copy of ``a`` (numpy's
    casting, as ``np.array(a, dtype=np.float64)``), whose data :func:`writable` hands to
    kernels without another copy (it is a view of a private array of a marker class),
    and whether every value is finite and ``>= 0`` (``False`` also means: not checked).

    A C-contiguous float64 ``a`` (a CPU tensor's loads) is copied and checked in one
    pass (:func:`_copy_plain`); anything else by numpy, unchecked."""
    owner = _FrozenBase(np.shape(a), dtype=np.float64)      # owns its data: views refer to it
    plain = False
    if type(a) is np.ndarray and a.dtype == np.float64 and a.flags.c_contiguous and 1 <= a.ndim <= 3:
        plain = _copy_plain(writable(a), owner.view(np.ndarray))
    else:
        owner[...] = a
    view = owner.view(np.ndarray)
    view.setflags(write=False)
    return view, bool(plain)


def warmer(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Register ``fn`` (no arguments) to run by :func:`compile_all`: it calls kernels on
    small inputs with the argument types real calls use, so they compile (or load from
    the cache) then."""
    _WARMERS.append(fn)
    return fn


def compile_all() -> int:
    """Compile (or load from the cache) every registered kernel; returns the number of
    warmers run.  Importing the modules that define kernels registers their warmers
    (the plan verifier's kernels, :mod:`eplb_opt.verify_kernels`, included)."""
    from . import apportion, grouping, local, matching, nodecover, packing, pipeline, resplit, robust, spill  # noqa: F401
    from .. import verify_kernels  # noqa: F401  (eplb_opt.verify_kernels: numpy and numba only)

    for fn in list(_WARMERS):
        fn()
    return len(_WARMERS)


@kernel
def _copy_plain(src, dst):
    """Copy ``src`` into ``dst`` (float64, the same C-contiguous shape) and return
    whether every value is finite and ``>= 0`` (NaN is not), in one branch-free pass."""
    a, b = src.reshape(src.size), dst.reshape(dst.size)
    ok = True
    for i in range(a.size):
        x = a[i]
        b[i] = x
        ok &= (x >= 0.0) & (x < np.inf)
    return ok


@warmer
def _warm() -> None:
    """Compile :func:`_copy_plain` for the loads of one window and of several."""
    for shape in ((2,), (1, 2), (1, 1, 2)):
        frozen_copy(np.ones(shape))
