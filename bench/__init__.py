"""meshnode's benchmark suite: `meshnode bench` (see docs/benchmarks.md)."""
