"""daad-inspect training side (desktop, PyTorch): data, the DAAD model, training, evaluation, export.

Submodules that need torch import it themselves; `train.synthetic` and `train.data` readers
used by tests and the demo stay importable without it.
"""
