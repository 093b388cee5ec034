"""argparse types the four tools share, so a flag is refused in the same words by each."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count of at least 1 (frames, iterations, batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a whole number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected a whole number of at least 1")
    return value
