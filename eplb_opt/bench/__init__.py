"""``eplb-opt bench`` and its machinery, shipped with the package.

* :mod:`eplb_opt.bench.runner`: runs every eplb-opt mode and the peers on a suite (or a
  recorded trace) and writes ``results.json``, ``REPORT.md`` and plots.
* :mod:`eplb_opt.bench.peers`: the peers (DeepSeek EPLB, SGLang's variants, vLLM's default
  policy), loaded from their published wheels, fetched once into a cache
  (``~/.cache/eplb-opt/peers`` or ``$EPLB_OPT_PEER_CACHE``).

Importing this package loads nothing heavy; its modules import torch.  The scripts that
record ``benchmarks/RESULTS.md`` (in the source repository) build on these modules.
"""

__all__ = ["peers", "runner"]


def __getattr__(name: str):
    if name in __all__:
        from importlib import import_module

        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
