"""Fast, batched EPLB heuristics over numpy arrays (part of the ``eplb-opt`` distribution).

Not the unrelated PyPI project also named ``heuristics``: this package ships inside
``eplb-opt`` and depends on numpy and numba only (no torch, no OR-Tools).  Its hot loops
are numba kernels, all compiled with one set of options by
:mod:`eplb_opt.heuristics.compile` (cached on disk, no fastmath, sequential sums, so plans
are identical on every rank); :func:`eplb_opt.heuristics.compile.compile_all` compiles
them up front.  Arrays in, arrays out; every function documents its shapes.  It checks
only the shapes it depends on: validate user input with ``eplb_opt`` first.
"""

from .apportion import add_replicas, max_replica_load, remove_replicas, replica_counts
from .grouping import ENUMERATION_LIMIT, equal_partitions, groups_to_nodes, node_load_lower_bound, num_partitions
from .packing import (
    kk_layout,
    lpt_rounds_layout,
    pack_items,
    pack_loads,
    pack_sorted,
    runs_order,
    unsplit_runs,
    refine_swaps,
    separate_duplicates,
    snake_layout,
)
from .pipeline import Placement, pack_rows, place, replica_counts_of

__all__ = [
    "ENUMERATION_LIMIT",
    "Placement",
    "add_replicas",
    "equal_partitions",
    "groups_to_nodes",
    "kk_layout",
    "lpt_rounds_layout",
    "max_replica_load",
    "node_load_lower_bound",
    "num_partitions",
    "pack_items",
    "pack_loads",
    "pack_rows",
    "pack_sorted",
    "runs_order",
    "unsplit_runs",
    "place",
    "refine_swaps",
    "remove_replicas",
    "replica_counts",
    "replica_counts_of",
    "separate_duplicates",
    "snake_layout",
]
