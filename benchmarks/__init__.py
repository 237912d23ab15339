"""Benchmarks for eplb-opt: workload suites, peer loaders and the runner (not shipped in
the wheel; run from a source checkout)."""
