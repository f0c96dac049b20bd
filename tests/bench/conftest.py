"""The CPU dry run of the GPU proof, run once per session and read by every test of its parts (test_gpu.py,
test_gpu_e2e.py, test_gpu_real.py): one run of ``python -m bench.gpu --dry-run`` covers every part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    """``(process, record, output folder)`` of ``python -m bench.gpu --dry-run`` over every part."""
    from bench.gpu import cli

    out = tmp_path_factory.mktemp("gpu-dry-run")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / cli.JSON_NAME).read_text()), out
