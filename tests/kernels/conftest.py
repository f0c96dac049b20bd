import importlib
import sys
from pathlib import Path

import pytest
import torch

_KERNELS = str(Path(__file__).resolve().parents[2] / "kernels")
_KERNEL_MODULES = ("ragkern.kernels.attention", "ragkern.kernels.cross_entropy", "ragkern.kernels.lora")
# Tensor methods that read a value back to the host: on CUDA each one waits for the device (a sync).
_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")


@pytest.fixture
def host_syncs(monkeypatch):
    """A CUDA-free sync counter: every host read-back of a tensor value (``.item()``, ``.tolist()``, ``bool(t)``,
    ``int(t)``, ``torch.equal`` ...) made by code in ``kernels/`` is recorded as "function:line". Calls made by the
    Triton interpreter itself are not counted (on a GPU the launch reads no tensor values)."""
    calls: list[str] = []
    triton_dir = str(Path(sys.modules["triton"].__file__).parent) if "triton" in sys.modules else None

    def caller() -> str | None:
        f = sys._getframe(2)
        ours = None
        while f is not None:
            name = f.f_code.co_filename
            if triton_dir and name.startswith(triton_dir):
                return None
            if ours is None and name.startswith(_KERNELS):
                ours = f"{f.f_code.co_name}:{f.f_lineno}"
            f = f.f_back
        return ours

    def spy(name, original):
        def wrapped(*args, **kwargs):
            where = caller()
            if where is not None:
                calls.append(f"{name} in {where}")
            return original(*args, **kwargs)

        return wrapped

    for name in _SYNCING:
        monkeypatch.setattr(torch.Tensor, name, spy(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("equal", "nonzero", "unique"):
        monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
    return calls


def _poison(t: torch.Tensor) -> torch.Tensor:
    """NaN in a floating tensor, the dtype's largest value in an integer one (an index no kernel writes)."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).max)
    return t


class PoisonedTorch:
    """``torch`` as a kernel module sees it, but ``empty`` / ``empty_like`` hand out poisoned tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every ``torch.empty`` / ``empty_like`` made by a kernel module (its outputs and buffers) is NaN-filled
    (integers: their largest value), so an element a kernel fails to write shows up in its output. The modules'
    ``torch`` name is patched, not ``torch`` itself: tests and references allocate as usual."""
    for name in _KERNEL_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "torch", PoisonedTorch())


@pytest.fixture
def exact_half_dot(monkeypatch):
    """The interpreter's ``tl.dot`` on bf16 multiplies the raw 16-bit patterns (numpy has no bf16; DESIGN.md), and
    on fp16 runs numpy's slow generic loop. Widen 16-bit operands to fp32 first: exact (bf16 -> fp32 is a 16-bit
    shift, fp16 -> fp32 exact), and a product of two 16-bit values is exact in fp32, so the fp32-accumulated dot
    is the one a tensor core computes (up to summation order), at BLAS speed. A no-op without triton."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    import numpy as np

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16:
            return (x.data.astype(np.uint32) << 16).view(np.float32)
        return x.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if d.data.dtype == np.float32 and all(x.dtype in (tl.bfloat16, tl.float16) for x in (a, b)):
            return interpreter.TensorHandle(np.matmul(widen(a), widen(b)) + d.data, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture(scope="session")
def aot_records():
    """One record per (config, arch) of every kernel module's ``aot_specs()``, compiled for sm_80 and sm_90 once
    per session (minutes on a cold Triton cache); raises ``AotError`` listing every failure."""
    pytest.importorskip("triton")
    from ragkern.kernels import _aot

    return _aot.compile_modules(archs=_aot.ARCHS, strict=True)
