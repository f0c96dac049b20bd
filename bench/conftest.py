"""pytest-benchmark suites of the kernel micro-benchmarks: ``pytest bench/ --benchmark-only``.

The cases, the checks and the timing are bench.gpu.micro's (see its docstring): the same definitions
``python -m bench.gpu`` runs on a lent GPU. Without CUDA the suites run the PyTorch paths at tiny shapes
(``--micro-mode dry-run``, a few seconds); with CUDA the real shapes (``full``: 5 warm-up and 25 timed rounds).

    pytest bench/ --benchmark-only --benchmark-json=micro.json
    pytest-benchmark compare micro.json              # ragkern beside each peer, per case and phase

Only ``bench/test_*_bench.py`` are collected here: the scripts in bench/ and bench/gpu/ are not tests.

bench/attention.py, bench/loss.py and bench/lora.py stay as scripts: they are the published CPU measurements
(docs/measured.md quotes bench/results/{attention,loss,lora}.json) of other questions at other shapes, in fp32: the
per-example path against SDPA with a dense block-diagonal mask over a whole 4k row, the fused loss's peak resident
memory in fresh processes and its Triton traffic model, LoRA at 2,048 tokens. These suites are the kernels beside
their GPU peers, in bf16, with the cases the GPU proof runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest bench/` puts bench/ on the path, not the root bench.gpu lives under
    sys.path.insert(0, str(ROOT))

collect_ignore = ["gpu", "results"]  # the GPU proof and its outputs: no tests there


def pytest_addoption(parser):
    group = parser.getgroup("ragkern micro-benchmarks")
    group.addoption("--micro-mode", choices=("dry-run", "quick", "full"), default=None,
                    help="shapes and rounds (default: full on CUDA, dry-run, the tiny shapes, without)")  # fmt: skip
    group.addoption("--micro-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--micro-case", action="append", default=[], help="only this case key (repeatable)")
    group.addoption("--micro-rounds", default=None, metavar="W,N",
                    help="warm-up and timed rounds of every benchmark (default by mode: bench.gpu.micro.ROUNDS)")  # fmt: skip


def _ctx(config):
    ctx = getattr(config, "_micro_ctx", None)
    if ctx is None:
        import torch

        from bench.gpu.harness import Ctx

        dev = config.getoption("micro_device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(dev)
        mode = config.getoption("micro_mode") or ("full" if device.type == "cuda" else "dry-run")
        ctx = config._micro_ctx = Ctx(device=device, mode=mode)
    return ctx


def pytest_generate_tests(metafunc):
    if "micro_item" in metafunc.fixturenames:
        from bench.gpu import micro

        found = micro.items(
            _ctx(metafunc.config), metafunc.module.PART, metafunc.config.getoption("micro_case")
        )
        metafunc.parametrize("micro_item", found, ids=[i.id for i in found])


@pytest.fixture
def micro_bench(benchmark, request):
    """``micro_bench(item)``: prepare the item's case (once), then time the item with ``benchmark.pedantic``."""
    from bench.gpu import micro

    ctx = _ctx(request.config)
    return lambda item: micro.bench_item(ctx, benchmark, item)


def pytest_sessionstart(session):
    from bench.gpu import micro

    micro.REPORT["cases"].clear()
    opt = session.config.getoption("micro_rounds")
    micro.rounds_override = tuple(int(x) for x in opt.split(",")) if opt else None
    if micro.rounds_override is not None and (
        len(micro.rounds_override) != 2 or micro.rounds_override[1] < 1
    ):
        raise pytest.UsageError(f"--micro-rounds takes W,N with N >= 1; got {opt}")


def pytest_sessionfinish(session, exitstatus):
    from bench.gpu import micro

    micro.release()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.excinfo is not None and call.excinfo.typename == "CaseTimeout":  # bench.gpu's budget ran out
        item.session.shouldstop = f"{item.nodeid}: {call.excinfo.value}"


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.gpu import micro

    ctx = _ctx(config)
    machine_info["ragkern_device"] = micro.device_name(ctx)
    machine_info["ragkern_mode"] = ctx.mode


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from bench.gpu import micro

    output_json["ragkern"] = {"mode": _ctx(config).mode, "rounds": list(micro.rounds(_ctx(config))),
                              "cases": micro.REPORT["cases"]}  # fmt: skip
