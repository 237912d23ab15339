"""Numba prototype of a simplified hierarchical EPLB pipeline, fixed to the DeepSeek-V3
prefill topology (8 groups, 4 nodes, 32 GPUs, 288 replicas): groups to nodes by exhaustive
pairing, greedy replica counts, Karmarkar-Karp seed (linked lists, insertion sort), single
swap refinement and duplicate separation, in one njit call over all rows with preallocated
work arrays.  Experiment only (see README.md here)."""

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

# stop codes for stage timing (run everything up to and including the stage)
ST_GROUPS, ST_COUNTS, ST_ITEMS, ST_SEED, ST_REFINE, ST_SEP, ST_ALL = 1, 2, 3, 4, 5, 6, 7


@numba.njit(cache=True, inline="always")
def _kk_seed(ld, m, k, sums, head, tail, nxt, alive, tmps, th, tt, gi, gl):
    """ld sorted decreasing, len m*k (k blocks of m items). Writes gi[m, k] and gl[m].
    Same result as proto.kk_seed (stable insertion sort == numba argsort for m <= 15)."""
    nb = k
    for b in range(nb):
        for i in range(m):
            it = b * m + i
            sums[b, i] = ld[it]
            head[b, i] = it
            tail[b, i] = it
            nxt[it] = -1
        alive[b] = True
    for _ in range(nb - 1):
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
        # heaviest of a with lightest of c; insertion sort (stable, decreasing) as we go
        for i in range(m):
            j = m - 1 - i
            v = sums[a, i] + sums[c, j]
            h = head[a, i]
            nxt[tail[a, i]] = head[c, j]
            t = tail[c, j]
            p = i
            while p > 0 and v > tmps[p - 1]:
                tmps[p] = tmps[p - 1]
                th[p] = th[p - 1]
                tt[p] = tt[p - 1]
                p -= 1
            tmps[p] = v
            th[p] = h
            tt[p] = t
        for i in range(m):
            sums[a, i] = tmps[i]
            head[a, i] = th[i]
            tail[a, i] = tt[i]
        alive[c] = False
    for b in range(nb):
        if alive[b]:
            for i in range(m):
                it = head[b, i]
                s = 0
                while it >= 0:
                    gi[i, s] = it
                    s += 1
                    it = nxt[it]
                gl[i] = sums[b, i]
            return


@numba.njit(cache=True, inline="always")
def _apply_swap(gi, sl, gl, ex, cnt, g, s, o, t):
    """Swap slot s of GPU g with slot t of GPU o: items, slot loads, GPU loads, counts."""
    ia = gi[g, s]
    ib = gi[o, t]
    d = sl[g, s] - sl[o, t]
    gi[g, s] = ib
    gi[o, t] = ia
    sl[g, s], sl[o, t] = sl[o, t], sl[g, s]
    gl[g] -= d
    gl[o] += d
    cnt[g, ex[ia]] -= 1
    cnt[g, ex[ib]] += 1
    cnt[o, ex[ib]] -= 1
    cnt[o, ex[ia]] += 1


@numba.njit(cache=True, inline="always")
def _swap_refine(gi, sl, gl, ex, cnt, nswap):
    """Same as proto.swap_refine. sl[g, s] = load of item gi[g, s] (kept in sync);
    cnt[m, nex] must be filled by the caller."""
    m, k = gi.shape
    for _ in range(nswap):
        h = 0
        lh = gl[0]
        for g in range(1, m):
            if gl[g] > lh:
                lh = gl[g]
                h = g
        best = lh
        bs = -1
        bo = -1
        bt = -1
        for s in range(k):
            la = sl[h, s]
            for o in range(m):
                if o == h:
                    continue
                lo = gl[o]
                if lo >= best:  # any d > 0 gives nm > lo >= best
                    continue
                # branch-free prefilter: skip the row unless some t beats best
                mn = np.inf
                for t in range(k):
                    d = la - sl[o, t]
                    mn = min(mn, max(lh - d, lo + d))
                if mn >= best:
                    continue
                for t in range(k):
                    d = la - sl[o, t]
                    # d <= 0 implies lh - d >= lh >= best, so the old `d <= 0` test is implied
                    nm = max(lh - d, lo + d)
                    if nm >= best:
                        continue
                    ea = ex[gi[h, s]]
                    eb = ex[gi[o, t]]
                    if cnt[h, eb] > 0 or cnt[o, ea] > 0:
                        if ea != eb:
                            continue
                    best = nm
                    bs, bo, bt = s, o, t
        if bs < 0:
            break
        _apply_swap(gi, sl, gl, ex, cnt, h, bs, bo, bt)


@numba.njit(cache=True, inline="always")
def _separate(gi, sl, gl, ex, cnt, cap):
    """Remove duplicate replicas on one GPU by swaps (within the node) that keep both GPUs
    <= cap (the row's current maximum GPU load) and create no new duplicate. Returns number
    of swaps. Among valid partners pick the one with the smallest resulting max load."""
    m, k = gi.shape
    nsw = 0
    changed = True
    while changed:
        changed = False
        for g in range(m):
            for s in range(k):
                ia = gi[g, s]
                ea = ex[ia]
                if cnt[g, ea] < 2:
                    continue
                la = sl[g, s]
                best = np.inf
                bo = -1
                bt = -1
                for o in range(m):
                    if o == g or cnt[o, ea] > 0:
                        continue
                    for t in range(k):
                        eb = ex[gi[o, t]]
                        if cnt[g, eb] > 0:
                            continue
                        d = la - sl[o, t]
                        ng_ = gl[g] - d
                        no_ = gl[o] + d
                        if ng_ > cap or no_ > cap:
                            continue
                        nm = max(ng_, no_)
                        if nm < best:
                            best = nm
                            bo = o
                            bt = t
                if bo >= 0:
                    _apply_swap(gi, sl, gl, ex, cnt, g, s, bo, bt)
                    nsw += 1
                    changed = True
    return nsw


@numba.njit(cache=True)
def pipeline_into(w, pairings, ng, nn, ngpu, nrep, maxcnt, nswap, separate, stop,
                  phy2log, log2phy, logcnt):
    L, E = w.shape
    gsz = E // ng
    epn = E // nn
    rpn = nrep // nn
    gpu_pn = ngpu // nn
    k = nrep // ngpu
    width = log2phy.shape[2]
    npair = pairings.shape[0]
    # ---- work arrays, allocated once per call ----
    glg = np.empty(ng)
    eids = np.empty((nn, epn), np.int64)
    wr = np.empty(epn)
    cnt = np.empty(epn, np.int64)
    per = np.empty(epn)
    eord = np.empty(epn, np.int64)
    so = np.empty(epn, np.int64)
    gv = np.empty((ng, gsz))
    go = np.empty((ng, gsz), np.int64)
    assert ng == 2 * nn  # pairing tables below assume two groups per node
    ex = np.empty((nn, rpn), np.int64)
    ld = np.empty((nn, rpn))
    sums = np.empty((k, gpu_pn))
    head = np.empty((k, gpu_pn), np.int64)
    tail = np.empty((k, gpu_pn), np.int64)
    nxt = np.empty(rpn, np.int64)
    alive = np.empty(k, np.bool_)
    tmps = np.empty(gpu_pn)
    th = np.empty(gpu_pn, np.int64)
    tt = np.empty(gpu_pn, np.int64)
    gi = np.empty((nn, gpu_pn, k), np.int64)
    gload = np.empty((nn, gpu_pn))
    sl = np.empty((nn, gpu_pn, k))
    gcnt = np.empty((nn, gpu_pn, epn), np.int64)
    fill = np.empty(E, np.int64)
    nsep = 0
    # pairings -> (first, second) group of each node (only valid for 2 groups per node)
    psum = np.empty((ng, ng))
    pa = np.full((npair, nn), -1, np.int64)
    pb = np.empty((npair, nn), np.int64)
    for p in range(npair):
        for g in range(ng):
            n = pairings[p, g]
            if pa[p, n] < 0:
                pa[p, n] = g
            else:
                pb[p, n] = g
    for l in range(L):
        # ---- groups -> nodes (exhaustive over the pairings) ----
        for g in range(ng):
            s = 0.0
            for j in range(g * gsz, (g + 1) * gsz):
                s += w[l, j]
            glg[g] = s
        # node load of pairing p = max over its pairs of glg[x] + glg[y] (x < y); identical to
        # accumulating 0.0 + glg[x] + glg[y] in group order
        for x in range(ng):
            for y in range(x + 1, ng):
                psum[x, y] = glg[x] + glg[y]
        best = np.inf
        bi = 0
        for p in range(npair):
            mx = psum[pa[p, 0], pb[p, 0]]
            for n in range(1, nn):
                v = psum[pa[p, n], pb[p, n]]
                if v > mx:
                    mx = v
            if mx < best:
                best = mx
                bi = p
        if stop <= ST_GROUPS:
            continue
        # ---- per-group order of experts by (-w, index): stable insertion sort ----
        for g in range(ng):
            off = g * gsz
            for j in range(gsz):
                v = w[l, off + j]
                p = j
                while p > 0 and v > gv[g, p - 1]:
                    gv[g, p] = gv[g, p - 1]
                    go[g, p] = go[g, p - 1]
                    p -= 1
                gv[g, p] = v
                go[g, p] = j
        for n in range(nn):
            x = pa[bi, n]  # node's groups, x < y (same expert order as the old version)
            y = pb[bi, n]
            for j in range(gsz):
                eids[n, j] = x * gsz + j
                eids[n, gsz + j] = y * gsz + j
                wr[j] = w[l, x * gsz + j]
                wr[gsz + j] = w[l, y * gsz + j]
            # node order so[] by (-wr, local index): merge of the two group orders
            i1 = 0
            i2 = 0
            for q in range(epn):
                if i2 >= gsz or (i1 < gsz and gv[x, i1] >= gv[y, i2]):
                    so[q] = go[x, i1]
                    i1 += 1
                else:
                    so[q] = gsz + go[y, i2]
                    i2 += 1
            # ---- replica counts: same greedy (max wr/cnt, ties -> lowest index). Experts
            # with cnt == 1 are so[q:], whose best is so[q]; the others are so[:q]. ----
            for j in range(epn):
                cnt[j] = 1
            q = 0
            for _ in range(rpn - epn):
                bj = -1
                bv = -1.0
                first = False
                if q < epn and maxcnt > 1:
                    bj = so[q]
                    bv = wr[bj]
                    first = True
                for i in range(q):
                    j = so[i]
                    c = cnt[j]
                    if c < maxcnt:
                        v = wr[j] / c
                        if v > bv or (v == bv and j < bj):
                            bv = v
                            bj = j
                            first = False
                if first:
                    q += 1
                cnt[bj] += 1
            for j in range(epn):
                logcnt[l, eids[n, j]] = cnt[j]
            if stop <= ST_COUNTS:
                continue
            # ---- items by per-replica load decreasing, ties by expert (== stable mergesort):
            # sort the <= rpn-epn multi-replica experts, merge with so[q:] ----
            nmul = 0
            for i in range(q):
                j = so[i]
                v = wr[j] / cnt[j]
                p = nmul
                while p > 0 and (v > per[p - 1] or (v == per[p - 1] and j < eord[p - 1])):
                    per[p] = per[p - 1]
                    eord[p] = eord[p - 1]
                    p -= 1
                per[p] = v
                eord[p] = j
                nmul += 1
            i1 = 0
            i2 = q
            c = 0
            while i1 < nmul or i2 < epn:
                if i2 >= epn:
                    take1 = True
                elif i1 >= nmul:
                    take1 = False
                else:
                    j2 = so[i2]
                    take1 = per[i1] > wr[j2] or (per[i1] == wr[j2] and eord[i1] < j2)
                if take1:
                    j = eord[i1]
                    v = per[i1]
                    i1 += 1
                else:
                    j = so[i2]
                    v = wr[j] / cnt[j]
                    i2 += 1
                for _ in range(cnt[j]):
                    ex[n, c] = j
                    ld[n, c] = v
                    c += 1
            if stop <= ST_ITEMS:
                continue
            # ---- KK seed ----
            _kk_seed(ld[n], gpu_pn, k, sums, head, tail, nxt, alive, tmps, th, tt,
                     gi[n], gload[n])
            if stop <= ST_SEED:
                continue
            # ---- swap refinement ----
            for g in range(gpu_pn):
                for j in range(epn):
                    gcnt[n, g, j] = 0
                for s in range(k):
                    it = gi[n, g, s]
                    gcnt[n, g, ex[n, it]] += 1
                    sl[n, g, s] = ld[n, it]
            _swap_refine(gi[n], sl[n], gload[n], ex[n], gcnt[n], nswap)
        if stop <= ST_REFINE:
            continue
        # ---- duplicate separation (cap = the row's maximum GPU load) ----
        if separate:
            cap = gload[0, 0]
            for n in range(nn):
                for g in range(gpu_pn):
                    if gload[n, g] > cap:
                        cap = gload[n, g]
            for n in range(nn):
                nsep += _separate(gi[n], sl[n], gload[n], ex[n], gcnt[n], cap)
        if stop <= ST_SEP:
            continue
        # ---- outputs ----
        for n in range(nn):
            for g in range(gpu_pn):
                base = (n * gpu_pn + g) * k
                for s in range(k):
                    phy2log[l, base + s] = eids[n, ex[n, gi[n, g, s]]]
        for e in range(E):
            fill[e] = 0
            for t in range(width):
                log2phy[l, e, t] = -1
        for p in range(nrep):
            e = phy2log[l, p]
            log2phy[l, e, fill[e]] = p
            fill[e] += 1
    return nsep


@numba.njit(cache=True)
def pipeline(w, pairings, ng, nn, ngpu, nrep, maxcnt, nswap, separate):
    L, E = w.shape
    phy2log = np.empty((L, nrep), np.int64)
    logcnt = np.empty((L, E), np.int64)
    log2phy = np.empty((L, E, nrep - E + 1), np.int64)
    pipeline_into(w, pairings, ng, nn, ngpu, nrep, maxcnt, nswap, separate, ST_ALL,
                  phy2log, log2phy, logcnt)
    return phy2log, log2phy, logcnt


def run(w, separate=True):
    return pipeline(w, PAIRINGS, NG, NN, NGPU, R, MAXCNT, NSWAP, separate)


def alloc_out(w):
    L, E = w.shape
    return (np.empty((L, R), np.int64), np.empty((L, E, R - E + 1), np.int64),
            np.empty((L, E), np.int64))


def run_into(w, out, separate=True, stop=ST_ALL):
    pipeline_into(w, PAIRINGS, NG, NN, NGPU, R, MAXCNT, NSWAP, separate, stop, *out)
    return out
