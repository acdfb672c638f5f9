"""What every benchmark script does at its end: write its figures as JSON."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, results: Any) -> None:
  """Writes `results` to `path` (creating its directory), indented for reading."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
