"""One module per workload; each exposes `run(bench) -> list[Figure]`."""
