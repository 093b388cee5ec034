"""`python -m agent --config FILE`: the same as the daad-agent console script."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
