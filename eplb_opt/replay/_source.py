"""Per-step traces ``[T, L, E]``, read in chunks of steps.

What streams (memory independent of the trace's length):

* an ``.npy`` file: opened with ``numpy.load(mmap_mode="r")``;
* a ``.safetensors`` file holding one ``[T, L, E]`` tensor (named ``loads``, or the only
  one): read slice by slice with ``safetensors.safe_open``;
* a numpy array or ``numpy.memmap`` passed in: used as it is, converted chunk by chunk.

What loads whole (``read_trace(path, window=1)``, float64 ``T x L x E x 8`` bytes):
``.npz``, ``.pt``/``.pth``, ADRS ``.json``, SGLang dump directories, TensorRT-LLM dump
directories, and torch tensors passed in (copied to a CPU numpy array first).

Every chunk is converted to float64 and checked (finite, non-negative) as it is read.
Chunks start at multiples of the chunk size, counted from step 0, whatever the source, so
a streamed file and the same array in memory give bit-identical sums.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import InvalidProblemError, InvalidTypeError
from ..traces import TraceError, read_trace

__all__ = ["CHUNK_BYTES", "History", "TraceSource", "open_trace"]

# Float64 bytes one chunk of steps may take (the converted copy; the matmuls that score a
# chunk take a few times this).
CHUNK_BYTES = 32 * 2**20


class TraceSource:
    """A per-step trace ``[T, L, E]`` read in chunks as float64.

    Attributes:
        shape: ``(T, L, E)``.
        label: what the trace is (a path, or the kind of array), for messages.
        streams: True when reading never holds more than a chunk of the trace.
    """

    def __init__(self, data: Any, label: str, streams: bool, closer: ExitStack | None = None) -> None:
        self._data = data
        self._closer = closer
        self.label = label
        self.streams = streams
        self.shape: tuple[int, int, int] = tuple(int(x) for x in data.shape)  # type: ignore[assignment]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Steps ``start .. stop - 1`` as a new float64 ``[stop - start, L, E]`` array."""
        try:
            raw = np.asarray(self._data[start:stop])
        except Exception as exc:  # noqa: BLE001 - a truncated file, an unreadable dtype, ...
            raise TraceError(f"{self.label}: steps {start}..{stop - 1} could not be read "
                             f"({type(exc).__name__}: {exc})") from None
        if raw.dtype.kind not in "iuf":
            raise TraceError(f"{self.label}: loads must be numeric, got dtype {raw.dtype}")
        out = raw.astype(np.float64)
        lo, hi = (out.min(), out.max()) if out.size else (0.0, 0.0)
        if not (lo >= 0 and np.isfinite(hi)):                # NaN fails the first test, inf the second
            raise TraceError(f"{self.label}: steps {start}..{stop - 1} hold negative or non-finite loads "
                             "(loads are token counts)")
        return out

    def chunks(self, start: int, stop: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first step, float64 steps)`` over ``start .. stop - 1``, cut at multiples of ``chunk``."""
        a = start
        while a < stop:
            b = min(stop, (a // chunk + 1) * chunk)
            yield a, self.read(a, b)
            a = b

    def sum(self, start: int, stop: int, chunk: int) -> np.ndarray:
        """``[L, E]`` float64 sum of steps ``start .. stop - 1``, chunk by chunk."""
        total = np.zeros(self.shape[1:], dtype=np.float64)
        for _, w in self.chunks(start, stop, chunk):
            total += w.sum(axis=0)
        return total

    def close(self) -> None:
        """Release the file handle a streamed ``.safetensors`` trace holds (idempotent)."""
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> "TraceSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_chunk(shape: tuple[int, int, int]) -> int:
    """Steps per chunk: as many as fit :data:`CHUNK_BYTES` in float64 (at least 1)."""
    return max(1, CHUNK_BYTES // (8 * shape[1] * shape[2]))


class History:
    """The steps a policy may plan from: ``start .. stop - 1`` of the trace, oldest first.

    Reads go to the trace when asked (chunk by chunk), so a policy pays only for what it
    uses.  ``summed()`` is computed once per rebalance and shared by every policy.

    Attributes:
        start, stop: the first step and one past the last step.
        num_steps: ``stop - start``.
    """

    def __init__(self, source: TraceSource, start: int, stop: int, chunk: int) -> None:
        self._source, self._chunk = source, chunk
        self.start, self.stop = int(start), int(stop)
        self.num_steps = self.stop - self.start
        self._summed: np.ndarray | None = None

    def summed(self) -> np.ndarray:
        """``[L, E]`` float64 (read-only): the steps summed, as DeepSeek and vLLM record a window."""
        if self._summed is None:
            s = self._source.sum(self.start, self.stop, self._chunk)
            s.setflags(write=False)
            self._summed = s
        return self._summed

    def steps(self) -> np.ndarray:
        """``[num_steps, L, E]`` float64: every step, as SGLang's recorder buffers them
        (``num_steps x L x E x 8`` bytes)."""
        return self._source.read(self.start, self.stop)

    def windows(self, n: int) -> np.ndarray:
        """``[n, L, E]`` float64: the steps cut into ``n`` consecutive sub-windows of
        near-equal length (oldest first), each summed; ``1 <= n <= num_steps``."""
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise InvalidTypeError(f"n must be an integer number of sub-windows, got {type(n).__name__} {n!r}")
        if not 1 <= n <= self.num_steps:
            raise InvalidProblemError(f"n must be between 1 and the {self.num_steps} steps of the history, got {n}")
        edges = self.start + (np.arange(n + 1) * self.num_steps) // n
        return np.stack([self._source.sum(int(a), int(b), self._chunk) for a, b in zip(edges[:-1], edges[1:])])


def _checked_array(arr: Any, label: str) -> Any:
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "iuf":
        raise InvalidTypeError(f"trace must hold numeric loads, got dtype {dtype} ({label})")
    if len(arr.shape) != 3:
        hint = " (one step? a replay needs a step axis: [steps, layers, experts])" if len(arr.shape) == 2 else ""
        raise InvalidProblemError(f"trace must be [steps, layers, experts], got shape {tuple(arr.shape)}{hint}")
    if 0 in tuple(arr.shape):
        raise InvalidProblemError(f"trace has an empty axis: shape {tuple(arr.shape)}")
    return arr


def _npy(path: Path) -> TraceSource:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated header, pickled data, ...
        raise TraceError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = arr[None]                      # one step, as read_trace reads it
    return TraceSource(_checked_array(arr, str(path)), str(path), streams=True)


def _safetensors(path: Path) -> TraceSource:
    from safetensors import SafetensorError, safe_open

    stack = ExitStack()
    try:
        fh = stack.enter_context(safe_open(str(path), framework="numpy"))
        keys = list(fh.keys())
        name = "loads" if "loads" in keys else (keys[0] if len(keys) == 1 else None)
        sl = fh.get_slice(name) if name is not None else None
        shape = tuple(sl.get_shape()) if sl is not None else ()
    except (SafetensorError, OSError, ValueError) as exc:
        stack.close()
        raise TraceError(f"{path}: not a readable safetensors file ({exc})") from None
    if sl is None or len(shape) != 3:
        stack.close()                         # several tensors, one step, ...: read_trace explains
        return _whole(path)

    class _Sliced:
        def __init__(self) -> None:
            self.shape = shape
            self.dtype = np.dtype(np.float64)   # checked per chunk by TraceSource.read

        def __getitem__(self, key: slice) -> np.ndarray:
            return sl[key]

    return TraceSource(_checked_array(_Sliced(), str(path)), str(path), streams=True, closer=stack)


def _whole(path: Path) -> TraceSource:
    steps = read_trace(path, window=1)
    return TraceSource(_checked_array(steps, str(path)), str(path), streams=False)


def open_trace(trace: Any) -> TraceSource:
    """A :class:`TraceSource` for a path (see module docs), a numpy array / memmap, or a
    torch tensor ``[steps, layers, experts]``.

    Raises:
        TraceError: a file that is missing, unreadable or misshapen.
        InvalidProblemError / InvalidTypeError: an array of the wrong shape or dtype.
    """
    if isinstance(trace, (str, Path)):
        p = Path(trace)
        if not p.exists():
            raise TraceError(f"{p}: no such file or directory")
        suffix = p.suffix.lower() if p.is_file() else ""
        if suffix == ".npy":
            return _npy(p)
        if suffix == ".safetensors":
            return _safetensors(p)
        return _whole(p)
    if type(trace).__module__.startswith("torch"):
        t = trace.detach().cpu()
        if t.is_complex() or str(t.dtype) == "torch.bool":
            raise InvalidTypeError(f"trace must hold real numeric loads, got dtype {t.dtype}")
        t = t.double() if t.is_floating_point() else t.long()
        return TraceSource(_checked_array(t.numpy(), "torch tensor"), "torch tensor", streams=False)
    if isinstance(trace, np.ndarray):
        label = "numpy.memmap" if isinstance(trace, np.memmap) else "numpy array"
        return TraceSource(_checked_array(trace, label), label, streams=True)
    if isinstance(trace, (list, tuple)):
        try:
            arr = np.asarray(trace)
        except (TypeError, ValueError) as exc:
            raise InvalidTypeError(f"trace could not be read as a numeric array: {exc}") from None
        return TraceSource(_checked_array(arr, "nested sequence"), "nested sequence", streams=False)
    raise InvalidTypeError(
        f"trace must be a path, a numpy array or a torch tensor [steps, layers, experts], got {type(trace).__name__}")
