"""Fault-injection tests import their harness as a plain module (tests are not a package)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
