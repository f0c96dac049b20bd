"""bench/gpu/e2e.py: the end-to-end arms in the CPU dry run (every arm present, equal tokens per step, rotating
order, per-step times), the quick plan's device-time promise, and the summaries and ratios the table shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bench.gpu import cli, e2e, harness

ROOT = Path(__file__).resolve().parents[2]
DRY = harness.Ctx(device=torch.device("cpu"), mode="dry-run")


@pytest.fixture(scope="module")
def dry_e2e(dry_run):
    """The e2e part of the session's dry run of every part (tests/bench/conftest.py)."""
    proc, record, _ = dry_run
    (case,) = record["parts"]["e2e"]["cases"].values()
    return proc, record, case


@pytest.mark.slow
def test_dry_run_has_every_arm_ran_or_skipped_with_a_reason(dry_e2e):
    proc, record, case = dry_e2e
    assert case["status"] == "ok", case.get("error")
    assert list(case["arms"]) == [a.name for a in e2e.arms_for(DRY)]
    for name, arm in case["arms"].items():
        if arm["status"] == "skipped":  # only for a peer this machine cannot run, and it says why
            assert "needs CUDA" in arm["reason"] or "not installed" in arm["reason"], (name, arm)
            continue
        assert arm["status"] == "ok", (name, arm)
        ran = [r for r in arm["runs"] if r["status"] == "ok"]
        assert ran and all(r["status"] in ("ok", "skipped") for r in arm["runs"]), (name, arm["runs"])
        for r in ran:  # per-step times of every step, the warm-up ones excluded
            assert r["warmup_steps"] >= 3 and r["steps_timed"] == case["timed_steps"] == len(r["step_ms"]), (
                name
            )
            assert all(ms > 0 for ms in r["step_ms"]) and r["tokens_per_s"] > 0, name
        assert arm["step_ms_p20"] <= arm["step_ms_median"] <= arm["step_ms_p80"], name
    ours = [n for n, a in case["arms"].items() if n.startswith("rk_")]
    assert ours and all(case["arms"][n]["status"] == "ok" for n in ours)  # every ablation runs on the CPU
    assert "dry_run_note" in case and "trl_note" in case  # fewer timed steps, TRL without Liger: said so
    assert "e2e qwen2.5-0.5b" in proc.stdout and "plan (dry-run)" in proc.stdout.splitlines()[0]
    assert record["plan"]["cases"]["e2e"] == ["e2e qwen2.5-0.5b"]


@pytest.mark.slow
def test_dry_run_trains_the_same_examples_per_step_in_every_arm(dry_e2e):
    _, _, case = dry_e2e
    steps = {(name, r["repeat"]): (r["step_tokens"], r["step_lengths"])
             for name, a in case["arms"].items() for r in a["runs"] if r["status"] == "ok"}  # fmt: skip
    assert len({json.dumps(v) for v in steps.values()}) == 1, (
        steps
    )  # same examples (lengths) and tokens per step
    tokens, lengths = next(iter(steps.values()))
    assert tokens == case["bins"]["tokens"] and [len(x) for x in lengths] == case["bins"]["examples"]
    assert all(0 < t <= case["row_tokens"] for t in tokens)
    assert case["equal_tokens_per_step"]["equal"]
    # the padded floor computes its padding on top of the same real tokens
    floor = next(r for r in case["arms"][e2e.FLOOR]["runs"] if r["status"] == "ok")
    assert floor["computed_tokens"] >= floor["real_tokens"] and floor["micro_batches_per_step"] >= 1


@pytest.mark.slow
def test_dry_run_rotates_the_order_and_records_ratios_and_max_rows(dry_e2e):
    _, _, case = dry_e2e
    orders = case["orders"]
    assert len(orders) == e2e.REPEATS == 3
    for r, order in enumerate(orders):
        assert order == orders[0][r:] + orders[0][:r]
    for name, a in case["arms"].items():
        for r in a["runs"]:
            assert r["status"] != "ok" or name in orders[r["repeat"]]
    refs = case["references"]
    assert (
        refs["floor"] == e2e.FLOOR and refs["strongest_peer"] and not refs["strongest_peer"].startswith("rk_")
    )
    assert (
        case["arms"][e2e.FLOOR]["vs_floor"] == 1.0
        and case["arms"][refs["strongest_peer"]]["vs_strongest_peer"] == 1.0
    )
    assert case["speedup_tokens_per_s"] == case["arms"][e2e.OURS]["vs_floor"]
    assert set(case["max_row"]) <= {e2e.OURS, refs["strongest_peer"]}
    for probe in case["max_row"].values():
        for L, t in probe["tried"].items():
            assert t["status"] in ("ok", "oom", "error") and (
                t["status"] != "ok" or max(t["step_tokens"]) <= int(L)
            )


def test_quick_plan_fits_eight_device_minutes():
    """Budgets, start-up, warm-up and ceilings within LIMIT; LIMIT plus a case's overrun within the shell's hard
    timeout; that timeout within 8 minutes (and the full run's within a device call's 600 s)."""
    quick = cli.planned_seconds("quick")
    assert quick["total"] <= cli.LIMIT["quick"] and quick["at_most"] <= cli.DEVICE_MINUTES_QUICK * 60
    script = (ROOT / "bench/gpu/run_on_device.sh").read_text()
    quick_sh, full_sh = (int(x) for x in re.findall(r"^\s*limit=(\d+)", script, re.M))
    assert cli.LIMIT["quick"] + cli.CASE_OVERRUN_S < quick_sh <= cli.DEVICE_MINUTES_QUICK * 60
    assert cli.planned_seconds("full")["total"] <= cli.LIMIT["full"]
    assert cli.LIMIT["full"] + cli.CASE_OVERRUN_S < full_sh <= 600
    assert set(cli.BUDGETS["quick"]) == {"warmup", *cli.PARTS} == set(cli.BUDGETS["dry-run"])
    lines = cli._plan_lines("quick", cli.PARTS, True)
    assert f"= {quick['total']} s" in lines[0] and all(f"{p} " in lines[0] for p in cli.PARTS)


def _arm(tps, **kw):
    return {"status": "ok", "tokens_per_s": tps, **kw}


def test_ratios_against_the_floor_and_the_strongest_peer():
    arms = {
        "hf_pad_sdpa": _arm(100.0),
        "hf_flat_sdpa": _arm(300.0),
        "trl_sft_liger": _arm(250.0),
        "hf_flat_flex": {"status": "error", "error": "boom"},
        "hf_flat_sdpa_liger": {"status": "skipped", "reason": "liger-kernel is not installed"},
        "rk_pack_torch": _arm(150.0),
        "rk_full": _arm(600.0),
        "hf_flat_sdpa_lora": _arm(200.0),
        "rk_lora_fused": _arm(300.0),
    }
    refs = e2e.ratios(
        arms, lora={"hf_flat_sdpa_lora", "rk_lora_fused"}, ours={"rk_pack_torch", "rk_full", "rk_lora_fused"}
    )
    assert refs == {
        "floor": "hf_pad_sdpa",
        "strongest_peer": "hf_flat_sdpa",
        "strongest_lora_peer": "hf_flat_sdpa_lora",
    }
    assert arms["rk_full"]["vs_floor"] == 6.0 and arms["rk_full"]["vs_strongest_peer"] == 2.0
    assert arms["rk_pack_torch"]["vs_floor"] == 1.5 and arms["rk_pack_torch"]["vs_strongest_peer"] == 0.5
    assert arms["trl_sft_liger"]["vs_strongest_peer"] == pytest.approx(0.833)
    assert arms["rk_lora_fused"]["vs_strongest_peer"] == 1.5 and arms["rk_lora_fused"]["vs_floor"] is None
    assert "vs_floor" not in arms["hf_flat_flex"] and "vs_floor" not in arms["hf_flat_sdpa_liger"]
    # no floor, no peer: ratios are None, not an error
    lone = {"rk_full": _arm(10.0)}
    assert e2e.ratios(lone, set(), {"rk_full"})["strongest_peer"] is None
    assert lone["rk_full"]["vs_floor"] is None and lone["rk_full"]["vs_strongest_peer"] is None


def test_summary_of_repeats():
    runs = [
        {"status": "ok", "tokens_per_s": t, "step_ms": ms, "model_tflops_per_s": 1.0, "executed_tflops_per_s": 0.5,
         "peak_mem_bytes": mem, "real_tokens": 10, "step_tokens": [5, 5]}
        for t, ms, mem in ((100.0, [10.0, 20.0], 7), (300.0, [30.0, 40.0], 9), (200.0, [50.0], None))
    ] + [{"status": "skipped", "reason": "case budget spent"}]  # fmt: skip
    s = e2e.summarise(runs, peak_tflops=4.0)
    assert (s["repeats"], s["tokens_per_s"], s["tokens_per_s_min"], s["tokens_per_s_max"]) == (
        3,
        200.0,
        100.0,
        300.0,
    )
    assert (s["step_ms_median"], s["step_ms_p20"], s["step_ms_p80"]) == (30.0, 18.0, 42.0)
    assert s["peak_mem_bytes"] == 9 and s["mfu"] == 0.25
    assert e2e.summarise([{"status": "oom", "error": "OutOfMemoryError"}], None)["status"] == "oom"


def test_rotations_and_micro_batches():
    assert e2e._rotations(["a", "b", "c"], 3) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    examples = [{"input_ids": [i] * (i + 1)} for i in range(12)]
    bins = [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]
    items, ga = e2e._micro_batches(examples, bins, micro=4)
    assert ga == 3 and len(items) == 3 * len(bins)  # one optimizer step (ga micro-batches) per bin
    for k, b in enumerate(bins):
        assert [ex for item in items[k * ga : (k + 1) * ga] for ex in item] == [examples[i] for i in b]
        assert all(items[k * ga : (k + 1) * ga])


def test_torch_attention_is_forced_and_keeps_examples_apart():
    """rk_pack_torch: inside the context the "ragkern" attention's varlen call runs the per-example PyTorch
    backend whatever it asks for, and a packed example's outputs equal those of the example alone."""
    import ragkern.attention as ra

    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    before = ra.varlen_attention
    with e2e._torch_attention(True):
        assert ra.varlen_attention is not before and ra.flash_attn_varlen_func is None
        out = ra.varlen_attention(q, k, v, cu, 5, causal=True, backend="triton", validate=False)
    assert ra.varlen_attention is before
    alone = before(
        q[4:], k[4:], v[4:], torch.tensor([0, 5], dtype=torch.int32), 5, causal=True, backend="torch"
    )
    torch.testing.assert_close(out[4:], alone)


def test_table_survives_missing_and_failed_arms():
    case = {
        "status": "ok",
        "references": {"floor": None, "strongest_peer": "hf_flat_sdpa"},
        "arms": {
            "hf_flat_sdpa": {"status": "ok", "tokens_per_s": 10.0, "tokens_per_s_min": 9.0, "tokens_per_s_max": 11.0,
                             "repeats": 3, "step_ms_median": 1.0, "step_ms_p20": 0.9, "step_ms_p80": 1.1,
                             "peak_mem_bytes": None, "vs_floor": None, "vs_strongest_peer": 1.0},
            "rk_full": {"status": "error", "error": "boom"},
            "trl_sft_liger": {"status": "skipped", "reason": "trl is not installed"},
        },
    }  # fmt: skip
    old = {"status": "ok", "ragkern": {"tokens_per_s": 5.0}, "hf": {"error": "x"}}
    record = {"mode": "quick", "parts": {"e2e": {"cases": {"new": case, "old": old}, "counts": {}}}}
    text = "\n".join(cli._table(record))
    assert "hf_flat_sdpa" in text and "ERROR boom" in text and "SKIPPED trl is not installed" in text
    assert "ragkern 5 tok/s" in text


def test_the_parts_alarm_keeps_what_the_case_measured(monkeypatch):
    """The part's alarm (harness.CaseTimeout) raised in the middle of a run: the case returns the runs it finished,
    records the rest as not run, and skips the longest-row search, instead of losing everything."""
    calls = []

    def fake_run(ctx, arm, config, examples, bins, row, warmup):
        calls.append(arm.name)
        if len(calls) == 3:
            raise harness.CaseTimeout("stopped after 9 s: the part's time budget and its grace were spent")
        steps = [sum(len(examples[i]["input_ids"]) for i in b) for b in bins]
        return {"tokens_per_s": 100.0 * len(calls), "step_ms": [1.0, 2.0], "model_tflops_per_s": 0.1,
                "executed_tflops_per_s": 0.1, "peak_mem_bytes": None, "real_tokens": sum(steps[warmup:]),
                "computed_tokens": sum(steps[warmup:]), "target_tokens": 1, "step_tokens": steps,
                "step_lengths": [[1]] * len(steps), "wall_s": 0.01, "setup_s": 0.0}  # fmt: skip

    monkeypatch.setattr(e2e, "run_arm", fake_run)
    monkeypatch.setattr(e2e, "needs", lambda arm, ctx: None)
    out = e2e.e2e_case(DRY, "qwen2.5-0.5b")
    assert "stopped after 9 s" in out["stopped"] and len(calls) == 3
    first, second, third = out["orders"][0][:3]
    assert out["arms"][first]["status"] == out["arms"][second]["status"] == "ok"
    assert out["arms"][third]["status"] == "skipped" and "stopped" in out["arms"][third]["error"]
    assert all(len(a["runs"]) == e2e.REPEATS for a in out["arms"].values())
    assert all(not probe["tried"] for probe in out["max_row"].values())  # no time left: nothing probed
