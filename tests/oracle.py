"""Exact optimum of tiny EPLB instances, in rational arithmetic (tests only).

Independent of the package on purpose: nothing here imports ``eplb_opt`` or
``heuristics``, and every load is a :class:`fractions.Fraction` (the exact value of the
float64 input, which is the instance ``solve`` documents), so a bound or a status can
be checked with no tolerance at all.

A *plan* here is a tuple of GPU contents, each a sorted tuple of the expert ids on that
GPU (one entry per replica).  A replica of expert ``e`` carries ``w[e] / c[e]`` where
``c[e]`` counts its replicas in the plan (over the whole layer).  Enumeration is
exhaustive, canonical up to permuting GPUs (and, for the hierarchical policy, nodes).
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from itertools import combinations, product
from typing import Iterable, Iterator, Sequence

Plan = tuple[tuple[int, ...], ...]


def exact(values: Iterable[float]) -> list[Fraction]:
    """The exact rational values of float64 numbers."""
    return [Fraction(float(v)) for v in values]


def _count_vectors(experts: Sequence[int], replicas: int, cap: int) -> Iterator[dict[int, int]]:
    """Every replica count (each ``1..cap``) of ``experts`` summing to ``replicas``."""
    n = len(experts)

    def rec(i: int, left: int) -> Iterator[list[int]]:
        if i == n - 1:
            if 1 <= left <= cap:
                yield [left]
            return
        for c in range(1, min(cap, left - (n - 1 - i)) + 1):
            for rest in rec(i + 1, left - c):
                yield [c] + rest

    if n == 0:
        return
    for cs in rec(0, replicas):
        yield dict(zip(experts, cs))


def _splits(items: tuple[int, ...], bins: int, size: int, distinct: bool) -> Iterator[Plan]:
    """Every way to put the multiset ``items`` (sorted) into ``bins`` bins of exactly
    ``size`` items, bins as sorted tuples in non-decreasing order (one per unordered
    split); ``distinct``: no bin holds an item twice."""
    if bins == 0:
        if not items:
            yield ()
        return
    first, rest = items[0], items[1:]
    seen = set()
    for others in combinations(range(len(rest)), size - 1):
        bin_ = (first,) + tuple(rest[i] for i in others)
        if bin_ in seen:
            continue
        seen.add(bin_)
        if distinct and len(set(bin_)) < len(bin_):
            continue
        left = tuple(x for i, x in enumerate(rest) if i not in others)
        for tail in _splits(left, bins - 1, size, distinct):
            yield (bin_,) + tail


def block_plans(experts: Sequence[int], replicas: int, gpus: int, distinct: bool) -> list[Plan]:
    """Every plan of ``replicas`` replicas of ``experts`` (each at least one) on ``gpus``
    GPUs, ``replicas / gpus`` per GPU; ``distinct``: no GPU holds one expert twice."""
    k = replicas // gpus
    cap = gpus if distinct else replicas
    out: list[Plan] = []
    for counts in _count_vectors(list(experts), replicas, cap):
        items = tuple(sorted(e for e, c in counts.items() for _ in range(c)))
        out.extend(_splits(items, gpus, k, distinct))
    return out


@lru_cache(maxsize=None)
def equal_partitions(num_groups: int, num_nodes: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Every partition of ``range(num_groups)`` into ``num_nodes`` blocks of equal size
    (blocks unordered)."""
    m = num_groups // num_nodes

    def rec(left: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], ...]]:
        if not left:
            yield ()
            return
        head, rest = left[0], left[1:]
        for others in combinations(rest, m - 1):
            block = (head,) + others
            remaining = tuple(g for g in rest if g not in others)
            for tail in rec(remaining):
                yield (block,) + tail

    return tuple(rec(tuple(range(num_groups))))


def plans(num_experts: int, num_replicas: int, num_gpus: int, *, hierarchical: bool = False,
          num_groups: int = 1, num_nodes: int = 1, distinct: bool = False) -> Iterator[Plan]:
    """Every plan of one layer under the policy (GPU ``g`` of node ``n`` is
    ``n * G / N + g``)."""
    if not hierarchical or num_nodes == 1:
        yield from block_plans(range(num_experts), num_replicas, num_gpus, distinct)
        return
    gs = num_experts // num_groups
    rn, gpn = num_replicas // num_nodes, num_gpus // num_nodes
    for part in equal_partitions(num_groups, num_nodes):
        per_node = [block_plans([g * gs + i for g in block for i in range(gs)], rn, gpn, distinct)
                    for block in part]
        for combo in product(*per_node):
            yield tuple(gpu for node in combo for gpu in node)


def gpu_loads(w: Sequence[Fraction], plan: Plan) -> list[Fraction]:
    """Exact load of every GPU of ``plan`` under loads ``w``."""
    counts: dict[int, int] = {}
    for gpu in plan:
        for e in gpu:
            counts[e] = counts.get(e, 0) + 1
    return [sum((w[e] / counts[e] for e in gpu), Fraction(0)) for gpu in plan]


def _block_optimum(w: Sequence[Fraction], experts: Sequence[int], replicas: int, gpus: int,
                   distinct: bool) -> Fraction | None:
    best = None
    for p in block_plans(experts, replicas, gpus, distinct):
        t = max(gpu_loads(w, p))
        if best is None or t < best:
            best = t
    return best


def optimum(w: Sequence[Fraction], num_replicas: int, num_gpus: int, *, hierarchical: bool = False,
            num_groups: int = 1, num_nodes: int = 1, distinct: bool = False) -> Fraction:
    """The smallest possible busiest GPU of one layer (exhaustive; under the
    hierarchical policy the nodes of a group partition are independent, so the optimum
    is the best partition's worst node optimum)."""
    E = len(w)
    if not hierarchical or num_nodes == 1:
        best = _block_optimum(w, range(E), num_replicas, num_gpus, distinct)
    else:
        gs = E // num_groups
        best = None
        for part in equal_partitions(num_groups, num_nodes):
            nodes = [_block_optimum(w, [g * gs + i for g in block for i in range(gs)], num_replicas // num_nodes,
                                    num_gpus // num_nodes, distinct) for block in part]
            if any(t is None for t in nodes):
                continue
            if best is None or max(nodes) < best:
                best = max(nodes)
    if best is None:
        raise ValueError("no plan obeys these constraints")
    return best


def window_optimum(windows: Sequence[Sequence[Fraction]], num_replicas: int, num_gpus: int, objective: str,
                   **policy) -> Fraction:
    """Best plan for several windows of one layer: ``objective`` ``"worst"`` (max over
    windows of the busiest GPU) or ``"mean"`` (their mean)."""
    best = None
    for p in plans(len(windows[0]), num_replicas, num_gpus, **policy):
        tops = [max(gpu_loads(w, p)) for w in windows]
        t = max(tops) if objective == "worst" else sum(tops, Fraction(0)) / len(tops)
        if best is None or t < best:
            best = t
    if best is None:
        raise ValueError("no plan obeys these constraints")
    return best


def plan_max_load(w: Sequence[Fraction], phy2log_row: Sequence[int], num_gpus: int) -> Fraction:
    """Exact busiest GPU of a ``phy2log`` row (``-1``: an empty masked slot)."""
    row = list(phy2log_row)
    k = len(row) // num_gpus
    counts: dict[int, int] = {}
    for e in row:
        if e >= 0:
            counts[e] = counts.get(e, 0) + 1
    return max(sum((w[e] / counts[e] for e in row[g * k:(g + 1) * k] if e >= 0), Fraction(0))
               for g in range(num_gpus))


def layer_optima(weight, num_replicas: int, num_gpus: int, num_groups: int = 1, num_nodes: int = 1,
                 hierarchical: bool = False, distinct: bool = False) -> list[Fraction]:
    """:func:`optimum` of every row of an ``[L, E]`` array (its float64 image)."""
    return [optimum(exact(row), num_replicas, num_gpus, hierarchical=hierarchical, num_groups=num_groups,
                    num_nodes=num_nodes, distinct=distinct) for row in weight]


def assert_consistent_certificate(result) -> None:
    """For results too big for the oracle: ``solve`` replaced no bound as inconsistent
    with its plan (it names each such fallback in ``events`` instead of raising), and
    every ``"optimal"`` layer really has a gap within tolerance."""
    bad = [e for e in result.events if "inconsistent" in e]
    assert not bad, bad
    for s, g in zip(result.status, result.gap):
        assert s != "optimal" or g <= result.tolerance, (s, g)
