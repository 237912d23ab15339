"""Numba prototype of the hierarchical EPLB heuristic (groups->nodes, counts, KK+swap packing),
fixed to the DeepSeek-V3 prefill topology (8 groups, 4 nodes, 32 GPUs, 288 replicas).
Experiment only (see README.md here); the first, unoptimised version, kept for its
stage structure; ``proto_fast`` imports its constants and checks."""

import numpy as np
import numba

NG, NN, NGPU, R = 8, 4, 32, 288
MAXCNT = 8
NSWAP = 64


def _pairings():
    """All 105 ways to split groups 0..7 into 4 unordered pairs -> [105, 8] node index per group."""
    out = []

    def rec(rem, cur):
        if not rem:
            a = np.empty(8, np.int64)
            for n, (x, y) in enumerate(cur):
                a[x] = n
                a[y] = n
            out.append(a)
            return
        f = rem[0]
        for j in range(1, len(rem)):
            rec(rem[1:j] + rem[j + 1:], cur + [(f, rem[j])])

    rec(list(range(8)), [])
    return np.array(out)


PAIRINGS = _pairings()  # [105, 8]


@numba.njit(cache=True)
def groups_to_nodes(gl, pairings, nn):
    """Exhaustive: pick the pairing minimising the heaviest node. Returns node of each group."""
    best = np.inf
    bi = 0
    nl = np.empty(nn)
    for p in range(pairings.shape[0]):
        nl[:] = 0.0
        for g in range(gl.shape[0]):
            nl[pairings[p, g]] += gl[g]
        m = nl.max()
        if m < best:
            best = m
            bi = p
    return pairings[bi]


@numba.njit(cache=True)
def replica_counts(wr, nrep, maxcnt):
    e = wr.shape[0]
    cnt = np.ones(e, np.int64)
    for _ in range(nrep - e):
        bj = -1
        bv = -1.0
        for j in range(e):
            if cnt[j] < maxcnt:
                v = wr[j] / cnt[j]
                if v > bv:
                    bv = v
                    bj = j
        cnt[bj] += 1
    return cnt


@numba.njit(cache=True)
def kk_seed(load, m, k):
    """load sorted decreasing, len m*k. Returns members[m, k] (item idx) and sums[m]."""
    nb = k  # k blocks of m items
    sums = np.empty((nb, m))
    mem = np.empty((nb, m, k), np.int64)
    sz = np.zeros(nb, np.int64)
    alive = np.ones(nb, np.bool_)
    for b in range(nb):
        for i in range(m):
            sums[b, i] = load[b * m + i]
            mem[b, i, 0] = b * m + i
        sz[b] = 1
    tmps = np.empty(m)
    tmpm = np.empty((m, k), np.int64)
    for _ in range(nb - 1):
        # two alive partitions with the largest spread (subsets kept sorted decreasing)
        a = -1
        c = -1
        sa = -1.0
        sc = -1.0
        for b in range(nb):
            if alive[b]:
                s = sums[b, 0] - sums[b, m - 1]
                if s > sa:
                    c, sc = a, sa
                    a, sa = b, s
                elif s > sc:
                    c, sc = b, s
        # heaviest of a with lightest of c
        for i in range(m):
            j = m - 1 - i
            tmps[i] = sums[a, i] + sums[c, j]
            for t in range(sz[a]):
                tmpm[i, t] = mem[a, i, t]
            for t in range(sz[c]):
                tmpm[i, sz[a] + t] = mem[c, j, t]
        order = np.argsort(-tmps)
        nsz = sz[a] + sz[c]
        for i in range(m):
            o = order[i]
            sums[a, i] = tmps[o]
            for t in range(nsz):
                mem[a, i, t] = tmpm[o, t]
        sz[a] = nsz
        alive[c] = False
    for b in range(nb):
        if alive[b]:
            return mem[b].copy(), sums[b].copy()
    return mem[0].copy(), sums[0].copy()


@numba.njit(cache=True)
def swap_refine(gi, gl, load, ex, nex, nswap):
    """gi[m, k] item per slot, gl[m] GPU loads, ex[item] local expert id (< nex). In place."""
    m, k = gi.shape
    cnt = np.zeros((m, nex), np.int64)
    for g in range(m):
        for s in range(k):
            cnt[g, ex[gi[g, s]]] += 1
    for _ in range(nswap):
        h = np.argmax(gl)
        lh = gl[h]
        best = lh
        bs = -1
        bo = -1
        bt = -1
        for s in range(k):
            ia = gi[h, s]
            la = load[ia]
            ea = ex[ia]
            for o in range(m):
                if o == h:
                    continue
                lo = gl[o]
                for t in range(k):
                    ib = gi[o, t]
                    d = la - load[ib]
                    if d <= 0.0:
                        continue
                    nm = max(lh - d, lo + d)
                    if nm >= best:
                        continue
                    eb = ex[ib]
                    if cnt[h, eb] > 0 or cnt[o, ea] > 0:  # ea != eb since d > 0 ... unless equal loads
                        if ea != eb:
                            continue
                    best = nm
                    bs, bo, bt = s, o, t
        if bs < 0:
            break
        ia = gi[h, bs]
        ib = gi[bo, bt]
        d = load[ia] - load[ib]
        gi[h, bs] = ib
        gi[bo, bt] = ia
        gl[h] -= d
        gl[bo] += d
        cnt[h, ex[ia]] -= 1
        cnt[h, ex[ib]] += 1
        cnt[bo, ex[ib]] -= 1
        cnt[bo, ex[ia]] += 1


@numba.njit(cache=True)
def pipeline(w, pairings, ng, nn, ngpu, nrep, maxcnt, nswap):
    L, E = w.shape
    gsz = E // ng
    epn = E // nn
    rpn = nrep // nn
    gpu_pn = ngpu // nn
    k = nrep // ngpu
    phy2log = np.empty((L, nrep), np.int64)
    logcnt = np.empty((L, E), np.int64)
    width = nrep - E + 1
    log2phy = np.full((L, E, width), -1, np.int64)
    gl = np.empty(ng)
    eids = np.empty(epn, np.int64)
    wr = np.empty(epn)
    for l in range(L):
        for g in range(ng):
            gl[g] = w[l, g * gsz:(g + 1) * gsz].sum()
        nog = groups_to_nodes(gl, pairings, nn)
        for n in range(nn):
            # experts of node n (its groups in increasing order)
            c = 0
            for g in range(ng):
                if nog[g] == n:
                    for j in range(gsz):
                        eids[c] = g * gsz + j
                        wr[c] = w[l, g * gsz + j]
                        c += 1
            cnt = replica_counts(wr, rpn, maxcnt)
            # items
            ex = np.empty(rpn, np.int64)
            ld = np.empty(rpn)
            c = 0
            for j in range(epn):
                logcnt[l, eids[j]] = cnt[j]
                for _ in range(cnt[j]):
                    ex[c] = j
                    ld[c] = wr[j] / cnt[j]
                    c += 1
            order = np.argsort(-ld, kind="mergesort")
            ex = ex[order]
            ld = ld[order]
            gi, gload = kk_seed(ld, gpu_pn, k)
            swap_refine(gi, gload, ld, ex, epn, nswap)
            for g in range(gpu_pn):
                base = (n * gpu_pn + g) * k
                for s in range(k):
                    phy2log[l, base + s] = eids[ex[gi[g, s]]]
        fill = np.zeros(E, np.int64)
        for p in range(nrep):
            e = phy2log[l, p]
            log2phy[l, e, fill[e]] = p
            fill[e] += 1
    return phy2log, log2phy, logcnt


def run(w):
    return pipeline(w, PAIRINGS, NG, NN, NGPU, R, MAXCNT, NSWAP)
