"""The research scripts behind docs/research/ (each note gives its commands, run from the repository root as
`python -m benchmarks.research.NAME ...`); probe_protocol and probe_report are what the probes read and write."""
