"""Print `name==floor` for the dependencies whose lowest admitted release CI tests (`make test-lowest`):
the `>=` bound each has in pyproject.toml's `dependencies`, so the run follows the file."""

import re
import sys
from pathlib import Path

TESTED_AT_FLOOR = ("torch", "pytorch-lightning", "monai", "hydra-core", "torchmetrics")

text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)[1]  # tomllib: Python 3.11 on
floors = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?[^"]*?>=\s*([0-9][0-9.]*)', block, re.M))
if missing := [name for name in TESTED_AT_FLOOR if name not in floors]:
    sys.exit(f"pyproject.toml gives no >= floor for {', '.join(missing)}")
print("\n".join(f"{name}=={floors[name]}" for name in TESTED_AT_FLOOR))
