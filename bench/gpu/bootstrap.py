"""Before anything imports torch or ragkern: install the carried wheels into a temporary folder, and make
``ragkern.kernels`` importable from a plain checkout (the lent machine has the working tree, not an install).

Only the standard library here: this module runs before the interpreter choice (``TRITON_INTERPRET``) is made.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "bench" / "gpu" / "wheels"
MANIFEST = "manifest.json"  # written by wheels.sh: wheel names, sizes, the git commit they were fetched at


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """``ragkern.kernels`` is the repository's ``kernels/`` folder (pyproject's package-dir mapping). Appended
    last to ``sys.meta_path``: an installed or editable ragkern is found first and wins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "ragkern.kernels":
            return None
        init = ROOT / "kernels" / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install_kernels_finder() -> None:
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_KernelsFinder())


def install_wheels(folder: Path | None) -> dict:
    """``pip install --no-index --no-deps --target <tmp> folder/*.whl`` and put <tmp> first on ``sys.path``
    (spawned warm-up workers inherit it). Returns what happened, for the JSON; never raises."""
    folder = Path(folder) if folder is not None else WHEELS
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    info: dict = {"folder": str(folder), "wheels": [w.name for w in wheels]}
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            info["manifest"] = json.loads(manifest.read_text())
        except ValueError as e:
            info["manifest_error"] = str(e)
    if not wheels:
        info["status"] = "no wheels: peers that are not installed are skipped"
        return info
    target = tempfile.mkdtemp(prefix="ragkern-gpu-wheels-")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--target", target, *map(str, wheels)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    info.update(target=target, returncode=proc.returncode)
    if proc.returncode != 0:
        info["status"] = "pip install failed: peers from these wheels are skipped"
        info["stderr"] = proc.stderr[-3000:]
        return info
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    info["status"] = "installed"
    return info
