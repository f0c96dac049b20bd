"""The RAFT recipe on the real model as a benchmark: ``examples/raft_smollm2.py`` run as a user runs it, its
metrics written with the machine, versions and commit to ``bench/results/raft_smollm2.json``.

    python bench/recipe.py [recipe options, e.g. --threads 2 --output-dir runs/raft_smollm2]

Every option goes to the recipe unchanged (``python examples/raft_smollm2.py --help``); the JSON holds the
recipe's ``metrics.json`` (exact match before / after / without the oracle, chance, steps, tokens, seconds,
threads, load average) and the command line. The README and docs/measured.md quote it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "raft_smollm2.py"


def main(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("raft_smollm2", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    metrics = recipe.main(argv)
    path = write_results("raft_smollm2", {"command": ["examples/raft_smollm2.py", *argv], **metrics})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
