"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

Each kernel module lists the configurations it launches as ``aot_specs() -> list[AotSpec]``. :func:`compile_spec`
turns one spec into a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads
its resources with the ``cuobjdump`` bundled with Triton::

    {"kernel", "config", "arch", "registers", "stack_bytes", "shared_bytes", "hgmma", "hgmma_shapes",
     "async_copies", "int32_offsets"}

``stack_bytes > 0`` means register spills; ``hgmma`` counts Hopper warpgroup MMA instructions in the SASS and
``hgmma_shapes`` counts them per shape (``{"64x64x16": 8}``: wgmma M x N x K); ``async_copies`` counts the
software-pipelined global-to-shared copies in the TTGIR (cp.async or TMA; 0 means the loads were not pipelined);
``int32_offsets`` lists the 32-bit multiplies that feed pointer arithmetic and can pass 2^31
(:func:`int32_offset_overflows`).

The report must describe the binaries the JIT runs: a spec's ``values`` give the runtime values of its integer
arguments, specialised as ``triton.jit`` does (a value of 1 becomes a constant, a multiple of 16 gets
``tt.divisibility=16``, a value past int32 makes the argument i64), so the AOT compile sees the same code.

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
    # runtime values of integer arguments, specialised as triton.jit does (1 -> constant, % 16 == 0 -> divisible)
    values: dict[str, int] = field(default_factory=dict)
    # the archs whose launcher picks this config (None: every arch compiled)
    archs: tuple[int, ...] | None = None


class AotError(RuntimeError):
    pass


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (``TRITON_INTERPRET`` set and not 0): kernels then take CPU tensors,
    and cannot be compiled. The one check every kernel module uses."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise AotError(f"cuobjdump not found at {path}; is triton's NVIDIA backend installed?")
    return str(path)


def _attrs(spec: AotSpec) -> dict:
    return _specialised(spec)[2]


def _specialised(spec: AotSpec) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(signature, constexprs, attrs) of ``spec`` as the JIT would build them for its ``values``."""
    signature, constexprs = dict(spec.signature), dict(spec.constexprs)
    aligned = spec.aligned
    if aligned is None:
        aligned = tuple(n for n, t in signature.items() if t.startswith("*"))
    divisible = set(aligned)
    for name, value in spec.values.items():
        if signature.get(name, "constexpr") == "constexpr":
            raise AotError(f"{spec.kernel}: values[{name!r}] names no integer argument")
        divisible.discard(name)
        if value == 1:  # the JIT turns an integer argument equal to 1 into a constant
            signature[name], constexprs[name] = "constexpr", 1
            continue
        signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        if value % 16 == 0:
            divisible.add(name)
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if signature[n] != "constexpr"}
    return signature, constexprs, attrs


def describe_values(values: dict[str, int]) -> str:
    """Short text of the integer specialisation, for a spec's ``config``: ``"group=1 total%16"``."""
    parts = []
    for name, v in values.items():
        parts.append(f"{name}=1" if v == 1 else (f"{name}%16" if v % 16 == 0 else f"{name}~"))
    return " ".join(parts)


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` and return its resource record. Raises on compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise AotError("TRITON_INTERPRET is set: use compile_modules(), which compiles in a subprocess")
    signature, constexprs, attrs = _specialised(spec)
    src = ASTSource(spec.fn, signature, constexprs, attrs=attrs)
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
        "hgmma_shapes": hgmma_shapes(sass),
        "spills_in_loops": spills_in_loops(sass),
        "async_copies": async_copies(compiled.asm["ttgir"]),
        "int32_offsets": int32_offset_overflows(compiled.asm["ttir"]),
    }


def hgmma_shapes(sass: str) -> dict[str, int]:
    """Count of each wgmma shape in SASS: ``HGMMA.64x64x16.F32.BF16`` -> ``{"64x64x16": 1}``."""
    shapes: dict[str, int] = {}
    for m in re.finditer(r"\bHGMMA\.(\d+x\d+x\d+)", sass):
        shapes[m.group(1)] = shapes.get(m.group(1), 0) + 1
    return dict(sorted(shapes.items(), key=lambda kv: [int(x) for x in kv[0].split("x")]))


_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def spills_in_loops(sass: str) -> int:
    """Local-memory spill instructions (STL/LDL) inside a loop body of SASS: between a backward branch's target
    and the branch. A spill outside every loop runs once per program (saved before a loop, reloaded after it);
    one inside runs on every iteration, which is the spill that costs time."""
    loops, spills = [], []
    for m in _SASS_INSTR.finditer(sass):
        addr, instr = int(m.group(1), 16), m.group(2)
        if re.search(r"\b(?:STL|LDL)\b", instr):
            spills.append(addr)
        elif re.search(r"\bBRA\b", instr):
            target = re.search(r"\b0x([0-9a-f]+)\b", instr)
            if target is not None and int(target.group(1), 16) <= addr:
                loops.append((int(target.group(1), 16), addr))
    return sum(any(lo <= a <= hi for lo, hi in loops) for a in spills)


def async_copies(ttgir: str) -> int:
    """Global-to-shared async copies in TTGIR (cp.async or TMA): the loads the software pipeliner prefetches."""
    return len(re.findall(r"\b(?:ttg|triton_gpu|ttng)\.async(?:_tma)?_copy_global_to_local\b", ttgir))


# ------------------------------------------------------------------------------ 32-bit offset check (TTIR)

_I32_MAX = 2**31 - 1
_TYPE_MAX = {1: 1, 8: 2**7, 16: 2**15, 32: 2**31, 64: 2**63}  # |value| bound of an unknown iN
# ops whose integer result is computed from their operands (the data flow the check follows back from tt.addptr)
_FLOW = {
    "arith.addi",
    "arith.subi",
    "arith.muli",
    "arith.divsi",
    "arith.divui",
    "arith.remsi",
    "arith.remui",
    "arith.andi",
    "arith.ori",
    "arith.xori",
    "arith.shli",
    "arith.shrsi",
    "arith.shrui",
    "arith.minsi",
    "arith.maxsi",
    "arith.minui",
    "arith.maxui",
    "arith.select",
    "arith.extsi",
    "arith.extui",
    "arith.trunci",
    "arith.index_cast",
    "tt.splat",
    "tt.broadcast",
    "tt.expand_dims",
    "tt.reshape",
    "tt.trans",
    "ttg.convert_layout",
    "triton_gpu.convert_layout",
}
_PASS = {
    "arith.extsi",
    "arith.extui",
    "arith.index_cast",
    "tt.splat",
    "tt.broadcast",
    "tt.expand_dims",
    "tt.reshape",
    "tt.trans",
    "ttg.convert_layout",
    "triton_gpu.convert_layout",
}
_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOC = re.compile(r"\s+loc\(")
_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::(\d+))?\s*=\s*([\w.]+)\s*(.*)$")


@dataclass
class _Node:
    op: str
    operands: list
    bits: int | None  # integer width of the result (None: not an integer, e.g. a pointer or a float)
    text: str
    bound: int | None = None


def _int_bits(ty: str) -> int | None:
    m = re.search(r"(?:^|[x<\s])i(\d+)>*\s*$", ty.strip())
    return int(m.group(1)) if m else None


def _result_type(rest: str) -> str:
    body = re.split(r"\sloc\(", rest)[0]
    if " : " not in body:
        return ""
    ty = body.rsplit(" : ", 1)[1]
    return ty.rsplit(" to ", 1)[1] if " to " in ty else ty.split(", ")[-1]


def _loc_table(ttir: str) -> dict[str, str]:
    """``#locN`` -> ``file.py:line`` (callsites resolve to the callee's line, where the op is written)."""
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ttir, re.M))
    out: dict[str, str] = {}

    def resolve(key: str, depth: int = 0) -> str:
        if key in out or depth > 50:
            return out.get(key, key)
        text = raw.get(key, "")
        m = re.match(r'"([^"]+)":(\d+):\d+', text)
        if m:
            res = f"{Path(m.group(1)).name}:{m.group(2)}"
        elif (m := re.match(r"callsite\((#loc\d*) at (#loc\d*)\)", text)) or (
            m := re.match(r'"[^"]*"\((#loc\d*)\)', text)
        ):
            res = resolve(m.group(1), depth + 1)
        else:
            res = key
        out[key] = res
        return res

    for key in raw:
        resolve(key)
    return out


def int32_offset_overflows(ttir: str) -> list[str]:
    """32-bit integer multiplies in a kernel's TTIR whose product feeds pointer arithmetic (``tt.addptr``) and can
    pass 2^31, i.e. an offset that may wrap. One line per multiply: ``"file.py:line: <op text>"``.

    A bound on |value| is propagated through the integer ops: constants and ``tl.arange`` are exact, loop indices
    are bounded by their loop's bounds, program ids along y/z by the grid limit 65535; kernel arguments, loaded
    values and program ids along x are unbounded (any int32). One idiom is trusted: ``tl.program_id(axis) * BLOCK``
    (a tile's first index), because every launcher sizes its grid as ``cdiv(n, BLOCK)`` with ``n < 2^31``.
    So a block-local ``arange * 16`` passes, while ``token index * stride`` (an unbounded index times an
    unbounded argument) is reported unless it is computed in 64 bits. Loop-carried values count as unbounded.
    """
    locs = _loc_table(ttir)
    nodes: list[_Node] = []
    scopes: list[dict[str, int]] = [{}]
    addptr_offsets: list[int] = []

    def lookup(name: str) -> int | None:
        for scope in reversed(scopes):
            if name in scope:
                return scope[name]
        return None

    def define(name: str, node: _Node) -> int:
        nodes.append(node)
        scopes[-1][name] = len(nodes) - 1
        return len(nodes) - 1

    def unknown(ty: str, text: str) -> _Node:
        return _Node("?", [], _int_bits(ty), text)

    for line in ttir.splitlines():
        stripped = line.strip()
        if stripped.startswith("}"):
            if len(scopes) > 1:
                scopes.pop()
            if stripped.endswith("{"):  # "} else {"
                scopes.append({})
            continue
        if stripped.startswith("tt.func"):
            scopes.append({})
            for name, ty in re.findall(r"(%[\w.$-]+): ([^\s{,)]+(?:<[^>]*>+)?)", stripped):
                define(name, unknown(ty, stripped[:80]))
            continue
        if stripped.startswith("^bb"):  # region block arguments (reduce/scan combiners)
            for name, ty in re.findall(r"(%[\w.$-]+): ([\w<>x!.]+)", stripped):
                define(name, unknown(ty, stripped))
            continue
        m = _DEF.match(line)
        if m is None:
            if stripped.endswith("{"):
                scopes.append({})
            continue
        name, count, op, rest = m.group(1), m.group(2), m.group(3), m.group(4)
        loc = re.search(r"loc\((#loc\d*)\)\s*\{?\s*$", stripped)
        where = locs.get(loc.group(1), "?") if loc else "?"
        text = f"{where}: {name} = {op} {_LOC.split(rest)[0]}"
        if op == "scf.for":
            head = re.match(r"(%[\w.$-]+) = (%[\w.$-]+(?:#\d+)?) to (%[\w.$-]+(?:#\d+)?) step", rest)
            results = int(count or 1)
            for i in range(results):
                define(f"{name}#{i}" if count else name, unknown("", text))
            scopes.append({})
            if head:
                bounds = [lookup(head.group(2)), lookup(head.group(3))]
                define(head.group(1), _Node("scf.for.iv", bounds, 32, text))
            for arg in (
                re.findall(r"(%[\w.$-]+) = %", rest.split("iter_args(", 1)[-1])
                if "iter_args(" in rest
                else []
            ):
                define(arg, unknown("", text))
            continue
        ty = _result_type(rest)
        operand_text = re.split(r"\s:\s|\s+loc\(|\s\{", rest)[0]
        operands = [lookup(v) for v in _VALUE.findall(operand_text)]
        node = _Node(op, operands, _int_bits(ty), text)
        if op == "arith.constant":
            c = re.match(r"(?:dense<)?(-?\d+)\b", rest)
            node.bound = abs(int(c.group(1))) if c and node.bits else None
        elif op == "tt.make_range":
            r = re.search(r"end = (-?\d+)", rest), re.search(r"start = (-?\d+)", rest)
            node.bound = max(abs(int(r[0].group(1)) - 1), abs(int(r[1].group(1)))) if all(r) else None
        elif op in ("tt.get_program_id", "tt.get_num_programs"):
            node.bound = _I32_MAX if re.match(r"\s*x\b", rest) or "axis = 0" in rest else 65535
        if count:
            for i in range(int(count)):
                define(f"{name}#{i}", _Node("?", [], None, text))
            if stripped.endswith("{"):
                scopes.append({})
            continue
        define(name, node)
        if op == "tt.addptr" and len(operands) == 2 and operands[1] is not None:
            addptr_offsets.append(operands[1])
        if stripped.endswith("{"):
            scopes.append({})

    def bound(i: int | None) -> int:
        if i is None:
            return 2**63
        n = nodes[i]
        if n.bound is not None:
            return n.bound
        cap = _TYPE_MAX.get(n.bits or 64, 2**63)
        n.bound = cap  # provisional: breaks cycles
        b = [bound(j) for j in n.operands]
        if n.op in _PASS and b:
            v = b[0]
        elif n.op == "scf.for.iv":
            v = max(b)
        elif n.op in ("arith.addi", "arith.subi", "arith.ori", "arith.xori") and len(b) == 2:
            v = b[0] + b[1]
        elif n.op == "arith.muli" and len(b) == 2:
            v = b[0] * b[1]
            if _is_tile_start(i):
                v = min(v, _I32_MAX)
        elif n.op in ("arith.divsi", "arith.divui") and b:
            v = b[0]
        elif n.op in ("arith.remsi", "arith.remui") and len(b) == 2:
            v = min(b[0], b[1])
        elif n.op == "arith.andi" and len(b) == 2:
            v = (
                min(b)
                if any(nodes[j].op == "arith.constant" for j in n.operands if j is not None)
                else max(b)
            )
        elif n.op in ("arith.minsi", "arith.maxsi", "arith.minui", "arith.maxui") and b:
            v = max(b)
        elif n.op == "arith.select" and len(b) == 3:
            v = max(b[1], b[2])
        elif n.op == "arith.shli" and len(b) == 2 and b[1] < 64:
            v = b[0] << b[1]
        elif n.op in ("arith.shrsi", "arith.shrui") and b:
            v = b[0]
        elif n.op == "arith.trunci" and b:
            v = b[0]
        elif n.op in ("arith.cmpi", "arith.cmpf"):  # printed with its operands' type; the result is an i1
            v = 1
        else:
            v = cap
        n.bound = min(v, cap)
        return n.bound

    def _is_tile_start(i: int) -> bool:
        ops = [nodes[j].op if j is not None else "?" for j in nodes[i].operands]
        return sorted(ops) == ["arith.constant", "tt.get_program_id"]

    flagged: dict[int, str] = {}
    seen: set[int] = set()
    stack = list(addptr_offsets)
    while stack:
        i = stack.pop()
        if i is None or i in seen:
            continue
        seen.add(i)
        n = nodes[i]
        if n.op not in _FLOW or n.bits is None:
            continue
        if n.op == "arith.muli" and n.bits == 32 and not _is_tile_start(i):
            a, b = (bound(j) for j in n.operands)
            if a * b > _I32_MAX:
                flagged[i] = n.text
        stack.extend(j for j in n.operands if j is not None)
    return [flagged[i] for i in sorted(flagged)]


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
        for i, spec in enumerate(importlib.import_module(name).aot_specs())
        for arch in archs
        if spec.archs is None or arch in spec.archs
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
    if not interpreting():
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
