"""``pytest bench/ --benchmark-only``: the kernel micro-benchmark suites run on the CPU and write pytest-benchmark
JSON whose groups put ragkern beside a peer (one case of each suite, two timed rounds: the mechanism, not times)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
ROOT = Path(__file__).resolve().parents[2]
CASES = ("attention-D16-causal", "flce-1k", "lora-p0.0")


def test_suites_write_pytest_benchmark_json_with_ragkern_beside_a_peer(tmp_path):
    out = tmp_path / "micro.json"
    cmd = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", f"--benchmark-json={out}", "-q",
           "-p", "no:cacheprovider", "--micro-rounds", "0,2", *[a for c in CASES for a in ("--micro-case", c)]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["ragkern_device"] == "cpu" and data["ragkern"]["rounds"] == [0, 2]
    groups: dict = {}
    for b in data["benchmarks"]:
        x = b["extra_info"]
        assert b["group"] == f"{x['case_name']} [{x['phase']}]" and x["case"] in CASES
        assert b["stats"]["rounds"] == 2 and b["stats"]["median"] > 0
        groups.setdefault(b["group"], []).append(x)
    expected = {f"{name} [{phase}]" for name in ("attention D=16 causal", "flce 1k targets", "lora dropout=0.0")
                for phase in ("fwd", "bwd")}  # fmt: skip
    assert set(groups) == expected
    for group, members in groups.items():
        assert [m["impl"] for m in members if m["ours"]], group
        peers = [m for m in members if not m["ours"]]
        assert peers and all(m["agrees"] for m in peers), (group, peers)  # checked before timing
    # the case records: skipped and failed implementations are there too, with their reasons
    cases = data["ragkern"]["cases"]
    assert set(cases) == set(CASES)
    assert cases["flce-1k"]["impls"]["ragkern_triton"]["status"] == "skipped"
    assert cases["flce-1k"]["mean_target_loss_nats"] < 2.5  # peaked hidden states (uniform: ln 1000 = 6.9)
    # pytest-benchmark's own comparison reads it, ragkern beside its peers
    cli = (
        "import sys; from pytest_benchmark.cli import main; sys.exit(main())"  # the pytest-benchmark command
    )
    cmp = subprocess.run([sys.executable, "-c", cli, "compare", str(out), "--group-by=group", "--columns=median"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "benchmark 'flce 1k targets [bwd]'" in cmp.stdout and "torch_matmul_ce-bwd" in cmp.stdout
