"""Scripts that record eplb-opt's benchmark figures (``benchmarks/RESULTS.md``); run from
a source checkout.  The suite runner and the peer loaders they build on ship with the
package (:mod:`eplb_opt.bench`), so ``eplb-opt bench`` also works where eplb-opt is
installed."""
