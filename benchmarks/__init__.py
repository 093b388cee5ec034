"""The product's benchmarks (bench_*.py, fault_drills.py, the peer comparison) and their protocol; the research
probes behind docs/research/ are the subpackage `benchmarks.research` (run as `python -m benchmarks.research.X`)."""
