"""RagTrainer's fused loss under torch FSDP2 (``fully_shard``) on two CPU ranks (gloo, torchrun).

The fused loss reads ``lm_head.weight`` outside the lm_head's forward, where FSDP2 keeps it a sharded DTensor
(the hazard reported against Liger's and Cut Cross-Entropy's fused losses). Each configuration must take the
fused path (no silent fallback to materialised logits) and give the single-process loss and gradients of a
packed batch: LoRA or full fine-tuning, tied or untied lm_head, the lm_head in the root unit or its own (with
the embedding when tied), the root resharded after forward or not. See fsdp2_script.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "fsdp2_script.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(
        [*cmd, str(SCRIPT), "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


CONFIGS = [
    f"{name}/root_reshard={reshard}"
    for name in (
        "lora",
        "lora_head_unit",
        "lora_on_lm_head",
        "lora_on_lm_head_unit",
        "full",
        "full_head_unit",
        "full_tied",
        "full_tied_head_unit",
    )
    for reshard in (None, True)
]


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_loss_under_fully_shard_matches_one_process(results, config):
    r = results[config]
    assert "error" not in r, r.get("error")
    # the fused loss ran on the all-gathered lm_head, on both iterations; it did not fall back to the logits
    assert r["fallback"] == [], r["fallback"]
    assert r["fused_calls"] == 3  # two training steps, one evaluation (no_grad)
    assert r["min_grad_scale"] > 0  # every compared gradient is nonzero, so the comparison is not vacuous
    assert max(r["loss_rel"]) < 1e-5, r["losses"]
    assert max(r["grad_rel"]) < 1e-5, r["grad_rel"]
    assert max(r["token_rel"]) < 1e-5 and all(r["hits_equal"])  # per-token losses and argmax hits of the row
    assert r["eval_rel"] < 1e-5
    # FSDP2 all-gathers in a step: the fused loss adds none to the plain step (logits materialised), and
    # leaves the plain step's count as it found it (no reshard setting of a unit changed for good)
    gathers = r["all_gathers"]
    assert gathers["fused"] <= gathers["plain_before"] == gathers["plain"], gathers
