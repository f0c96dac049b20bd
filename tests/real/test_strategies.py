"""Smoke test of bench/strategies.py --quick: every phase kind (DAP, DSF, hybrid) trains and every metric is
scored on the real model, and a rerun resumes from the per-arm results instead of training again."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "strategies.py"


@pytest.fixture(scope="module")
def strategies():
    spec = importlib.util.spec_from_file_location("strategies", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rates(run: dict) -> list[float]:
    values = [m["exact_match"] for m in run["robustness"].values()] + [run["heldout_q"]["exact_match"]]
    values += list(run["no_oracle"].values()) + list(run["update"].values())
    values += list(run["rag_instructions"].values()) + [run["instructions"]["follow_rate"]]
    return values


def test_quick_grid_trains_each_phase_kind_scores_every_metric_and_resumes(
    strategies, smollm2_path, tmp_path
):
    argv = [
        "--quick",
        "--arms",
        "base,dsf,dap_hybrid",
        "--no-write",
        "--threads",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    summary = strategies.main(argv)
    runs = {r["arm"]: r for r in summary["runs"]}
    assert set(runs) == {"base", "dsf", "dap_hybrid"}
    assert runs["base"]["train_tokens"] == 0 and runs["base"]["phases"] == []
    assert [p["phase"] for p in runs["dsf"]["phases"]] == ["dsf"]
    assert [p["phase"] for p in runs["dap_hybrid"]["phases"]] == ["dap", "hybrid"]
    assert sum(p["steps"] for p in runs["dap_hybrid"]["phases"]) == sum(
        p["steps"] for p in runs["dsf"]["phases"]
    )
    for arm, run in runs.items():
        assert set(run["robustness"]) == {"0", "2"}, arm
        assert all(0.0 <= v <= 1.0 for v in _rates(run)), arm
        assert run["heldout_perplexity"] > 1.0, arm
        if arm != "base":
            assert run["train_tokens"] > 0 and run["train_seconds"] > 0, arm
    assert set(summary["table"]) == {"base", "dsf", "dap_hybrid"}
    assert summary["table"]["dsf"]["em_k0"]["n"] == 1
    # the per-arm files make a rerun read, not train: same results, no training time spent
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "base-s0.json",
        "dap_hybrid-s0.json",
        "dsf-s0.json",
    ]

    def train_again(*args):
        raise AssertionError("a finished arm was run again")

    strategies.run_arm, run_arm = train_again, strategies.run_arm
    try:
        again = strategies.main(argv)
    finally:
        strategies.run_arm = run_arm
    assert again["runs"] == summary["runs"]
    saved = json.loads((tmp_path / "dsf-s0.json").read_text())
    assert saved == runs["dsf"]


def test_arguments_are_checked(strategies):
    with pytest.raises(SystemExit):
        strategies.parse_args(["--arms", "raft,unknown"])
    with pytest.raises(SystemExit):
        strategies.parse_args(["--dap-share", "1.0"])
    args = strategies.parse_args(["--quick"])
    assert args.steps == 2 and args.seed_list == [0] and args.k_list == [0, 2]
