"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

Each kernel module lists the configurations it launches as ``aot_specs() -> list[AotSpec]``. :func:`compile_spec`
turns one spec into a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads
its resources with the ``cuobjdump`` bundled with Triton::

    {"kernel", "config", "arch", "registers", "stack_bytes", "shared_bytes", "hgmma"}

``stack_bytes > 0`` means register spills; ``hgmma`` counts Hopper warpgroup MMA instructions in the SASS.

Under ``TRITON_INTERPRET=1`` the kernels are interpreter objects that cannot be compiled, so
:func:`compile_modules` runs the work in a subprocess with the interpreter switched off.

Command line (prints one line: ``AOT-RECORDS <json list of records>``)::

    python -m ragkern.kernels._aot [--arch 80 --arch 90] [module ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
_MARK = "AOT-RECORDS "  # prefix of the subprocess's result line (imports may print other lines)


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of one Triton kernel."""

    kernel: str  # name shown in the report, e.g. "attn_fwd"
    fn: Any  # the triton.JITFunction
    signature: dict[str, str]  # every argument -> "*fp16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 2
    config: str = ""  # readable, e.g. "D=128 fp16 causal BLOCK_M=128 BLOCK_N=64 w8 s2"
    # tt.divisibility=16 hints; None = every pointer argument (torch allocations are 16-byte aligned)
    aligned: tuple[str, ...] | None = field(default=None)


class AotError(RuntimeError):
    pass


def _in_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise AotError(f"cuobjdump not found at {path}; is triton's NVIDIA backend installed?")
    return str(path)


def _attrs(spec: AotSpec) -> dict:
    names = list(spec.signature)
    aligned = spec.aligned
    if aligned is None:
        aligned = tuple(n for n, t in spec.signature.items() if t.startswith("*"))
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` and return its resource record. Raises on compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _in_interpreter():
        raise AotError("TRITON_INTERPRET is set: use compile_modules(), which compiles in a subprocess")
    src = ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs), attrs=_attrs(spec))
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{spec.kernel}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        )
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage.stdout)
    if m is None:
        raise AotError(f"cannot parse cuobjdump resource usage:\n{usage.stdout}")
    registers, stack, static_shared = (int(x) for x in m.groups())
    return {
        "kernel": spec.kernel,
        "config": spec.config,
        "arch": f"sm_{arch}",
        "registers": registers,
        "stack_bytes": stack,
        "shared_bytes": static_shared + int(compiled.metadata.shared),  # Triton's shared memory is dynamic
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
    }


def kernel_modules() -> list[str]:
    """Names of the ``ragkern.kernels`` modules that define ``aot_specs``."""
    import ragkern.kernels as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if callable(getattr(mod, "aot_specs", None)):
            names.append(mod.__name__)
    return names


def _compile_task(task: tuple[str, int, int]) -> dict:
    """Compile spec ``index`` of ``module`` for ``arch`` (a picklable task for worker processes)."""
    name, index, arch = task
    spec = importlib.import_module(name).aot_specs()[index]
    try:
        return compile_spec(spec, arch)
    except Exception as e:  # noqa: BLE001 - reported per config
        msg = f"{name}: {spec.kernel} [{spec.config}] sm_{arch}: {type(e).__name__}: {e}"
        return {"kernel": spec.kernel, "config": spec.config, "arch": f"sm_{arch}", "error": msg}


def _compile_in_process(modules: list[str], archs: tuple[int, ...], strict: bool, jobs: int) -> list[dict]:
    tasks = [
        (name, i, arch)
        for name in modules
        for i in range(len(importlib.import_module(name).aot_specs()))
        for arch in archs
    ]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
            records = list(pool.map(_compile_task, tasks))
    else:
        records = [_compile_task(t) for t in tasks]
    errors = [r["error"] for r in records if "error" in r]
    if strict and errors:
        raise AotError("AOT compilation failed:\n" + "\n".join(errors))
    return records


def compile_modules(
    modules: list[str] | None = None,
    archs: tuple[int, ...] = ARCHS,
    *,
    strict: bool = True,
    jobs: int | None = None,
) -> list[dict]:
    """Compile every ``aot_specs()`` config of ``modules`` (default: all kernel modules) for each arch.

    Returns one record per (config, arch). ``strict`` raises :class:`AotError` listing every failure; otherwise
    a failed config yields a record with an ``"error"`` key. ``jobs`` worker processes (default: all cores).
    """
    jobs = jobs or os.cpu_count() or 1
    if not _in_interpreter():
        mods = modules if modules is not None else kernel_modules()
        return _compile_in_process(mods, tuple(archs), strict, jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "ragkern.kernels._aot",
        *[a for arch in archs for a in ("--arch", str(arch))],
    ]
    cmd += ["--jobs", str(jobs)]
    if not strict:
        cmd.append("--keep-going")
    cmd += modules or []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AotError(f"AOT subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if not lines:
        raise AotError(f"AOT subprocess printed no records:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(_MARK) :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", nargs="*", help="e.g. ragkern.kernels.attention (default: all)")
    p.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default: both)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--keep-going", action="store_true", help="report failed configs instead of exiting")
    args = p.parse_args(argv)
    records = compile_modules(
        args.modules or None, tuple(args.arch or ARCHS), strict=not args.keep_going, jobs=args.jobs
    )
    print(_MARK + json.dumps(records))


if __name__ == "__main__":
    main()
