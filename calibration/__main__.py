"""`python -m calibration` is `daad-calibrate`."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
