"""bench/gpu/tune.py: the CPU dry run of the backward tuning (every candidate in the interpreter) and its pieces."""

from __future__ import annotations

import pytest
import torch
from ragkern.kernels import attention as attn

from bench.gpu import harness, tune

pytestmark = pytest.mark.skipif(attn.triton is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def ctx():
    return harness.Ctx(device=torch.device("cpu"), mode="dry-run")


def test_plan_is_one_case_per_head_dim_like_micro(ctx):
    cases = tune.plan(ctx)
    assert [kw["head_dim"] for _, _, kw, _ in cases] == [128, 64, 256]  # the 0.96x shortfall first
    for name, fn, _kw, warmable in cases:
        assert isinstance(name, str) and callable(fn) and warmable is True


@pytest.mark.parametrize("head_dim", [128, 64, 256], ids=lambda d: f"d{d}")
def test_dry_run_runs_and_checks_every_candidate(ctx, head_dim):
    """Each sm_90 candidate's tiles run in the interpreter and match the reference; the first is timed through every
    path (the two relaunched kernels, the backward, forward + backward)."""
    out = tune.tune_bench(ctx, head_dim=head_dim)
    key = attn._bwd_key(head_dim, 90)
    assert out["status"] == "ok", out
    assert out["arch"] == "sm_90" and tuple(out["key"]) == key
    assert list(out["candidates"]) == list(attn._BWD_CANDIDATES[key])
    for name, entry in out["candidates"].items():
        assert entry["status"] == "ok" and entry["check_ok"], (name, entry)
        dkdv, dq = attn._BWD_CANDIDATES[key][name]
        assert entry["dkdv_config"] == tune._cfg_text(dkdv) and entry["dq_config"] == tune._cfg_text(dq)
    first = next(iter(out["candidates"].values()))
    assert set(first["times"]) == {"dkdv", "dq", "bwd", "fwd_bwd"}
    assert all(t["median_ms"] > 0 and t["samples"] == 1 for t in first["times"].values())
    assert out["table_choice"] == attn._BWD_CHOICE[key]
    assert set(out["fastest"]) == {"dkdv", "dq", "bwd", "fwd_bwd"}
    assert not attn._BWD_OVERRIDE  # every override undone


def test_recorded_launch_carries_the_override_and_relaunches():
    """The override reaches the kernels (their BLOCK sizes, warps, stages), and a relaunch rewrites the same
    outputs: the tuner times the configuration it names."""
    dkdv, dq = attn._Config(32, 64, 8, 3), attn._Config(64, 32, 4, 3)
    q, k, v = (torch.randn(40, h, 16, requires_grad=True) for h in (2, 1, 1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    with attn._bwd_configs(dkdv=dkdv, dq=dq):
        out = attn.varlen_attention(q, k, v, cu, 23, backend="triton", validate=False)
        with tune._recording() as rec:
            dq_, dk_, dv_ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert attn._attn_bwd_dkdv_kernel is rec["dkdv"].kernel and attn._attn_bwd_dq_kernel is rec["dq"].kernel
    for name, cfg in (("dkdv", dkdv), ("dq", dq)):
        ((_, _, kwargs),) = rec[name].launches
        assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == (
            cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages
        )  # fmt: skip
    dk_args = rec["dkdv"].launches[0][1]
    written = dk_args[4]  # DK
    before = dk_.clone()
    written.fill_(float("nan"))
    tune._relaunch(rec["dkdv"])()
    torch.testing.assert_close(written, before)


def test_summarize_picks_the_fastest_candidate_that_passed():
    def entry(ms, ok=True, status="ok"):
        t = {"median_ms": ms}
        return {"status": status, "check_ok": ok, "times": {"dkdv": t, "dq": t, "bwd": t, "fwd_bwd": t}}

    results = {
        "baseline": entry(2.0),
        "flex": entry(1.0, ok=False),
        "other": entry(1.6),
        "bad": {"status": "error"},
    }
    out = tune.summarize(results, "baseline")
    assert out["fastest"] == {"dkdv": "other", "dq": "other", "bwd": "other", "fwd_bwd": "other"}
    assert out["bwd_speedup_of_fastest_vs_table"] == 1.25
    assert tune.summarize(results, "other")["bwd_speedup_of_table_vs_baseline"] == 1.25
