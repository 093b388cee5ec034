"""daad-inspect runtime: model bundles, preprocessing and inference backends (no torch)."""
