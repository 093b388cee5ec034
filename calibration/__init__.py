"""On-site threshold calibration (no torch): good frames in, thresholds.yaml and a report out."""
