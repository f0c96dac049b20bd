"""examples/raft_smollm2.py runs end to end (a smoke run: 2 steps, a few questions; the numbers are the README's)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "raft_smollm2.py"


def test_recipe_smoke_run(smollm2_path, tmp_path):
    spec = importlib.util.spec_from_file_location("raft_smollm2", SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--steps", "2", "--train-records", "8", "--eval-records", "3", "--max-length", "512"]
    metrics = recipe.main([*argv, "--output-dir", str(tmp_path), "--max-new-tokens", "4"])
    assert metrics["steps"] == 2 and metrics["train_tokens"] > 0 and metrics["eval_records"] == 3
    for key in ("exact_match_before", "exact_match_after", "exact_match_without_oracle", "chance"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert (tmp_path / "adapter_model.safetensors").is_file()
