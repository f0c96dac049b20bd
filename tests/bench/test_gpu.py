"""bench/gpu: the CPU dry run of the GPU proof (every part, tiny shapes) and the pieces its verdicts rest on."""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from ragkern.kernels.attention import block_mask

from bench.gpu import bootstrap, cli, harness, micro, rag

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_case_of_every_part(dry_run):
    proc, record, out = dry_run
    assert record["mode"] == "dry-run" and list(record["parts"]) == list(cli.PARTS)
    assert "error" not in record["ceilings"] and "error" not in record["environment"]
    assert record["warmup"]["tasks"] and all(t["status"] == "ok" for t in record["warmup"]["tasks"].values())
    for part, rec in record["parts"].items():
        assert rec["cases"] and rec["counts"]["skipped"] == 0, part  # every case ran: no budget ran out
    table = (out / cli.TABLE_NAME).read_text().splitlines()
    assert proc.stdout.rstrip().splitlines()[-len(table) :] == table  # the table is printed last


@pytest.mark.slow
def test_dry_run_checks_pass(dry_run):
    """Kernels in the interpreter against float64, the packing invariants through RagTrainer in bf16 autocast,
    the torch paths against the peers, both ways of training: every case passes."""
    _, record, _ = dry_run
    bad = {(p, n): c.get("error") or c for p, rec in record["parts"].items() for n, c in rec["cases"].items()
           if c["status"] != "ok"}  # fmt: skip
    assert not bad
    for part in ("attention", "flce", "lora"):
        for name, case in record["parts"][part]["cases"].items():
            ours = [r for r in case["impls"].values() if r["ours"]]
            # the first is the one reported; a second variant may need CUDA (flce's impl="triton" in bf16)
            assert ours and ours[0]["status"] == "ok", (name, case)
            assert all(r["status"] == "ok" or "needs CUDA" in r.get("reason", "") for r in ours), (name, case)
            assert case.get("best_peer") and not case["peers_disagreeing"], (name, case)
            for r in case["impls"].values():
                assert r["status"] in ("ok", "skipped"), (name, r)
    for name, case in record["parts"]["e2e"]["cases"].items():
        assert case["ragkern"]["real_tokens"] > 0 and case["hf"]["real_tokens"] > 0, name
        assert case["hf"]["computed_tokens"] >= case["hf"]["real_tokens"], (
            name
        )  # padding: computed, not counted


# ------------------------------------------------------------------------------------------- harness


def _part(budget: float, record: dict) -> harness.Part:
    ctx = harness.Ctx(device=torch.device("cpu"), mode="dry-run")
    return harness.Part("test", ctx, budget, time.perf_counter() + 60, record)


def test_part_records_an_error_and_runs_the_next_case():
    record: dict = {}
    part = _part(30, record)
    part.case("boom", lambda ctx: 1 / 0)
    part.case("fine", lambda ctx, x: {"x": x}, x=3)
    part.case("checked", lambda ctx: {"status": "failed", "why": "tolerance"})
    part.finish()
    cases = record["cases"]
    assert cases["boom"]["status"] == "error" and "ZeroDivisionError" in cases["boom"]["traceback"]
    assert cases["fine"] == {"status": "ok", "x": 3, "elapsed_s": cases["fine"]["elapsed_s"]}
    assert cases["checked"]["status"] == "failed"
    assert record["counts"] == {"ok": 1, "failed": 1, "error": 1, "skipped": 0}


def test_part_interrupts_a_case_past_its_budget_and_skips_the_rest():
    record: dict = {}
    part = _part(0.4, record)
    t0 = time.perf_counter()
    part.case("stuck", lambda ctx: time.sleep(20))
    part.case("next", lambda ctx: {})
    assert time.perf_counter() - t0 < 5
    assert (
        record["cases"]["stuck"]["status"] == "error" and "CaseTimeout" in record["cases"]["stuck"]["error"]
    )
    assert record["cases"]["next"] == {"status": "skipped", "reason": "part budget spent"}


def test_compare_catches_one_wrong_row_and_an_unwritten_element():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8000, 64, dtype=torch.float64, generator=g)
    good = ref + 1e-6 * torch.randn(8000, 64, dtype=torch.float64, generator=g)
    one_row = good.clone()
    one_row[1234] = torch.randn(64, dtype=torch.float64, generator=g)  # norm error about sqrt(2 / 8000)
    ok, m = harness.compare({"o": good}, {"o": ref}, tol=1e-4)
    assert ok and m["o"]["rel_err"] < 1e-5
    ok, m = harness.compare({"o": one_row}, {"o": ref}, tol=3e-2)
    assert m["o"]["rel_err"] < 3e-2 and not ok  # the norm alone would pass it
    with harness.nan_poisoned_empty():
        out = torch.empty(5, 3)
        out[:, :2] = 0.0  # a "kernel" that forgets a column
    assert torch.isnan(torch.empty(4).fill_(1)).sum() == 0  # restored outside
    ok, m = harness.compare({"o": out}, {"o": torch.zeros(5, 3)}, tol=1.0)
    assert not ok and m["o"]["finite"] is False


def test_visible_pairs_count_the_mask():
    lengths, blk = rag.packed_row(700, seed=3, scale=0.1)
    assert sum(lengths) == 700 == blk.numel() and len(lengths) > 3
    dense_causal = sum(int(block_mask(torch.zeros(n, dtype=torch.int32)).sum()) for n in lengths)
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    dense_blocks = sum(int(block_mask(blk[a:b]).sum()) for a, b in zip(starts[:-1], starts[1:]))
    assert rag.visible_pairs(lengths) == dense_causal
    assert rag.visible_pairs(lengths, blk) == dense_blocks < dense_causal


def test_rag_examples_label_the_answer_only():
    examples = rag.examples(3000, 100, seed=1, scale=0.1, max_length=60)
    assert sum(len(e["input_ids"]) for e in examples) >= 3000
    for e in examples:
        n = len(e["input_ids"])
        assert n <= 60 and len(e["labels"]) == n == len(e["block_ids"])
        answer = [i for i, y in enumerate(e["labels"]) if y != -100]
        assert answer and answer == list(range(n - len(answer), n)) and e["block_ids"][-1] == 0


def test_ratio_only_against_peers_that_agree_and_run_the_backward():
    results = {
        "ours": {"ours": True, "status": "ok", "median_ms": 2.0},
        "fast_but_wrong": {"ours": False, "status": "ok", "median_ms": 0.5, "agrees": False},
        "forward_only": {
            "ours": False,
            "status": "ok",
            "median_ms": 0.7,
            "agrees": True,
            "forward_only": True,
        },
        "peer": {"ours": False, "status": "ok", "median_ms": 3.0, "agrees": True},
        "broken": {"ours": False, "status": "error"},
    }
    out = micro._ratios(results)
    assert out["best_peer"] == "peer" and out["peers_disagreeing"] == ["fast_but_wrong"]
    assert results["ours"]["speedup_vs_best_peer"] == 1.5


def test_no_speedup_for_a_kernel_whose_bf16_check_failed():
    impl = {"ours": True, "status": "ok", "speedup_vs_best_peer": 1.4}
    checks = {
        "flce bf16 plain": "failed",
        "lora bf16 r=16 dropout=0.0": "ok",
        "lora fp32 r=16 dropout=0.0": "failed",
    }
    record = {"parts": {
        "correctness": {"counts": {"ok": 1}, "cases": {n: {"status": s} for n, s in checks.items()}},
        "flce": {"cases": {"flce 1k targets": {"impls": {"ragkern": dict(impl)}}}},
        "lora": {"cases": {"lora dropout=0.0": {"impls": {"ragkern_kernel": dict(impl)}}}},
        "attention": {"cases": {"attention D=128 causal": {"impls": {"ragkern_triton": dict(impl)}}}},
    }}  # fmt: skip
    cli._withhold(record)
    impls = {p: next(iter(c["impls"].values())) for p, rec in record["parts"].items() if p != "correctness"
             for c in rec["cases"].values()}  # fmt: skip
    assert (
        "speedup_vs_best_peer" not in impls["flce"]
        and impls["flce"]["speedup_withheld"]["speedup_vs_best_peer"] == 1.4
    )
    assert impls["lora"]["speedup_vs_best_peer"] == 1.4 and "fp32" in impls["lora"]["correctness_note"]
    assert "did not run" in impls["attention"]["speedup_withheld"]["why"]  # no attention check ran


# ------------------------------------------------------------------------------------------- bootstrap


def test_kernels_finder_maps_the_kernels_folder():
    spec = bootstrap._KernelsFinder().find_spec("ragkern.kernels")
    assert Path(spec.origin) == ROOT / "kernels" / "__init__.py"
    assert list(spec.submodule_search_locations) == [str(ROOT / "kernels")]
    assert bootstrap._KernelsFinder().find_spec("ragkern.data") is None


def _tiny_wheel(folder: Path) -> Path:
    name = "gpubench_probe"
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


def test_install_wheels_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert bootstrap.install_wheels(tmp_path)["status"].startswith("no wheels")
    _tiny_wheel(tmp_path)
    info = bootstrap.install_wheels(tmp_path)
    assert info["status"] == "installed", info
    assert sys.path[0] == info["target"]
    import gpubench_probe

    assert gpubench_probe.VALUE == 42
    sys.modules.pop("gpubench_probe")


def test_source_digest_names_the_code_that_ran(tmp_path):
    from bench.gpu.cli import source_digest

    for d in ("ragkern", "kernels", "bench"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.py").write_text(f"x = '{d}'\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first
    (tmp_path / "kernels" / "a.py").write_text("x = 'changed'\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "kernels" / "a.py").write_text("x = 'kernels'\n")
    (tmp_path / "kernels" / "a.py").rename(tmp_path / "kernels" / "b.py")
    assert source_digest(tmp_path) != first  # a renamed file is other code too


# ------------------------------------------------------------------------------------------- micro-benchmarks


def _bench(case: str, impl: str, phase: str, median_s: float) -> dict:
    stats = {
        "median": median_s,
        "q1": median_s,
        "q3": median_s,
        "min": median_s,
        "max": median_s,
        "rounds": 10,
    }
    return {
        "group": f"{case} [{phase}]",
        "stats": stats,
        "extra_info": {"case": case, "impl": impl, "phase": phase},
    }


def test_fold_turns_the_suites_json_into_the_gpu_record():
    """bench.gpu's micro parts are pytest-benchmark runs: fold() gives the record the table and the withholding
    read (median_ms = forward + backward), the ratio against agreeing fwd+bwd peers, and per-phase speedups."""
    impls = {
        "ours": {"ours": True, "status": "ok"},
        "tile_build": {"ours": True, "status": "ok"},
        "peer": {"ours": False, "status": "ok", "agrees": True},
        "wrong": {"ours": False, "status": "ok", "agrees": False},
        "fwd_only": {"ours": False, "status": "ok", "agrees": True, "forward_only": True},
        "crashed_in_bwd": {"ours": False, "status": "ok", "agrees": True, "phase_errors": {"bwd": "OOM"}},
        "absent": {"ours": False, "status": "skipped", "reason": "needs CUDA"},
    }
    times = {("ours", "fwd"): 1e-3, ("ours", "bwd"): 2e-3, ("peer", "fwd"): 0.5e-3, ("peer", "bwd"): 4e-3,
             ("wrong", "fwd"): 0.1e-3, ("wrong", "bwd"): 0.1e-3, ("fwd_only", "fwd"): 0.2e-3,
             ("crashed_in_bwd", "fwd"): 0.1e-3, ("tile_build", "build"): 0.3e-3}  # fmt: skip
    data = {
        "ragkern": {"cases": {"k": {"name": "n", "part": "attention", "flops_fwd": 1e9, "flops_bwd": 2e9, "impls": impls}}},
        "benchmarks": [_bench("k", i, p, t) for (i, p), t in times.items()] + [_bench("other", "ours", "fwd", 9.0)],
    }  # fmt: skip
    rec = micro.fold(data, "k")
    got = rec["impls"]
    assert got["ours"]["median_ms"] == 3.0 and got["ours"]["tflops"] == 1.0
    assert got["ours"]["phases"]["fwd"]["median_ms"] == 1.0 and got["ours"]["phases"]["bwd"]["rounds"] == 10
    assert rec["best_peer"] == "peer" and got["ours"]["speedup_vs_best_peer"] == round(4.5 / 3.0, 3)
    assert (
        rec["peers_disagreeing"] == ["wrong"] and "tile_build" not in got and rec["metadata_build_ms"] == 0.3
    )
    assert got["crashed_in_bwd"]["status"] == "error" and "OOM" in got["crashed_in_bwd"]["error"]
    assert got["fwd_only"]["median_ms"] == 0.2  # timed, but never the best peer of a forward + backward
    assert rec["best_peer_fwd"] == "fwd_only" and got["ours"]["speedup_fwd_vs_best_peer"] == 0.2
    assert rec["best_peer_bwd"] == "peer" and got["ours"]["speedup_bwd_vs_best_peer"] == 2.0
    assert data["ragkern"]["cases"]["k"]["impls"]["ours"] == {"ours": True, "status": "ok"}  # not mutated
    lines = cli._case_lines("attention", "n", {"status": "ok", **rec})
    assert "x1.5" in lines[0] and "best peer peer" in lines[0] and "crashed_in_bwd" in lines[0]


def test_time_phase_times_forward_and_backward_apart_in_fixed_rounds():
    ctx = harness.Ctx(device=torch.device("cpu"), mode="quick")
    calls: list = []
    w = torch.ones(3, requires_grad=True)

    def fwd():
        calls.append("fwd")
        return (w * 2).sum()

    rt = {"fwd": fwd, "grad": None, "leaves": [w]}
    for phase in ("fwd", "bwd"):
        log: dict = {}

        def pedantic(target, setup, rounds, warmup_rounds, iterations, log=log):
            log.update(rounds=rounds, warmup=warmup_rounds, iterations=iterations, timed=[])
            for _ in range(warmup_rounds + rounds):
                args, kwargs = setup()
                calls.clear()
                target(*args, **kwargs)
                log["timed"].append(list(calls))

        micro.time_phase(ctx, pedantic, rt, phase)
        assert (log["warmup"], log["rounds"], log["iterations"]) == (*micro.ROUNDS["quick"], 1)
        assert log["rounds"] >= 10
        # the backward's forward runs in the untimed setup: the timed call of "bwd" runs no forward
        assert log["timed"] == [["fwd"] if phase == "fwd" else []] * (log["warmup"] + log["rounds"])
    assert w.grad is None  # gradients reset: nothing accumulates across rounds
    assert all(micro.ROUNDS[m][1] >= 10 for m in micro.ROUNDS)


def test_loss_peers_get_the_target_rows_and_peaked_hidden_states(monkeypatch):
    ctx = harness.Ctx(device=torch.device("cpu"), mode="dry-run")
    case = next(c for c in micro.cases(ctx, "flce") if c.key == "flce-1k")
    runtimes, extra = case.build()
    seen = []
    ce = micro.F.cross_entropy
    monkeypatch.setattr(
        micro.F, "cross_entropy", lambda logits, y, **kw: seen.append(logits.shape) or ce(logits, y, **kw)
    )
    runtimes["torch_matmul_ce"]["fwd"]()
    assert seen == [(case.shape["targets"], case.shape["V"])] and case.shape["targets"] < case.shape["N"]
    assert extra["mean_target_loss_nats"] < 2.5 < 6.9  # ln V = 6.9: random hidden states give about that


def test_one_definition_of_each_case():
    """bench.gpu's plan and the suites' parameters are the same cases, each implementation with its phases."""
    ctx = harness.Ctx(device=torch.device("cpu"), mode="dry-run")
    for part in ("attention", "flce", "lora"):
        cases = micro.cases(ctx, part)
        assert [name for name, *_ in micro.plan(ctx, part)] == [c.name for c in cases]
        got = [(i.case.key, i.impl, i.phase) for i in micro.items(ctx, part)]
        assert got == [(c.key, n, p) for c in cases for n, impl in c.impls.items() for p in impl.phases()]
        assert len({i.id for i in micro.items(ctx, part)}) == len(got)
    attn = micro.cases(ctx, "attention")[0]
    assert attn.impls["flex_doc"].phases() == ("fwd",)  # no FlexAttention backward on the CPU
    assert micro.SUITES["flce"].name == "test_loss_bench.py" and all(
        p.exists() for p in micro.SUITES.values()
    )


def test_time_ms_takes_a_fixed_number_of_samples():
    calls = []
    ctx = harness.Ctx(device=torch.device("cpu"), mode="quick")
    timing = ctx.time_ms(lambda: calls.append(1))
    warmup, rounds = harness.ROUNDS["quick"]
    assert len(calls) == warmup + rounds and timing["rounds"] == rounds >= 10
    assert timing["p20_ms"] <= timing["median_ms"] <= timing["p80_ms"]


def test_liger_style_patches_are_undone_after_an_arm():
    """Liger's apply_liger_kernel_to_* rebinds names of transformers' modeling modules for the whole process: an
    arm's patches must not reach the models of the arms after it."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    norm, forward = qwen2.Qwen2RMSNorm, qwen2.Qwen2ForCausalLM.forward
    with harness.undoing_patches("qwen2", "mistral"):
        qwen2.Qwen2RMSNorm = torch.nn.Identity
        qwen2.Qwen2ForCausalLM.forward = lambda self, *a, **k: None
        import transformers.models.mistral.modeling_mistral as mistral  # loaded inside: covered too

        mistral_norm = mistral.MistralRMSNorm
        mistral.MistralRMSNorm = torch.nn.Identity
    assert qwen2.Qwen2RMSNorm is norm and qwen2.Qwen2ForCausalLM.forward is forward
    assert mistral.MistralRMSNorm is mistral_norm


def test_a_case_timeout_is_not_swallowed_by_a_broad_handler():
    """The part's alarm must stop the case even where a peer's failure is caught with ``except Exception``."""
    record: dict = {}
    part = harness.Part(
        "p", harness.Ctx(device=torch.device("cpu"), mode="dry-run"), 0.3, float("inf"), record
    )
    after = []

    def case(ctx):
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001 - what a peer's guard does
            pass
        after.append(True)
        return {}

    entry = part.case("slow", case)
    assert entry["status"] == "error" and "CaseTimeout" in entry["error"] and not after
