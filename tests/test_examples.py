"""examples/train.py runs end to end on a tiny local model (as a user would launch it); examples/raft_smollm2.py's
options, progress, checkpoints and resume, on a tiny model in place of SmolLM2 (the real run: tests/real)."""

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.ragkern.tiny import tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_example_training_script(tmp_path):
    tok = word_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    records = [
        {
            "question": "who lives in rome?",
            "passages": ["alpha lives in rome", "beta lives in paris"],
            "answer": "alpha",
        },
        {"question": "who lives in paris?", "passages": ["beta lives in paris"], "answer": "beta"},
        {"text": "the river of rome is the river"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "--model_name_or_path",
        str(model_dir),
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_length",
        "128",
        "--max_steps",
        "2",
        "--lora_r",
        "4",
        "--report_to",
        "none",
        "--use_cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert "is_gradient_checkpointing" not in r.stderr  # peft's FutureWarning (transformers >= 5.2x)


@pytest.fixture
def recipe(monkeypatch):
    """examples/raft_smollm2.py as a module; torch's thread count and transformers' log level, which its main()
    sets, are restored afterwards."""
    spec = importlib.util.spec_from_file_location("raft_smollm2", ROOT / "examples" / "raft_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads, level = torch.get_num_threads(), logging.getLogger("transformers").level
    yield module
    torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(level)


def test_recipe_options(recipe, capsys):
    args = recipe.parse_args(["--threads", "1", "--save-steps", "5", "--resume"])
    assert (args.threads, args.save_steps, args.resume) == (1, 5, True)
    assert recipe.parse_args(["--resume", "runs/x/checkpoint-20"]).resume == "runs/x/checkpoint-20"
    defaults = recipe.parse_args([])
    assert defaults.resume is None and 0 < defaults.save_steps < defaults.steps  # a checkpoint part-way

    logging.getLogger("transformers").setLevel(logging.ERROR)  # as main() does: it would hide the bar
    training = recipe.training_arguments(args)
    assert not training.disable_tqdm
    assert (training.save_strategy, training.save_steps) == ("steps", 5)
    assert recipe.training_arguments(recipe.parse_args(["--save-steps", "0"])).save_strategy == "no"

    for bad in (["--threads", "0"], ["--save-steps", "-1"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
    assert "busy machine" in capsys.readouterr().out  # the --threads tip


def test_recipe_tiny_run_shows_progress_checkpoints_and_resumes(recipe, tmp_path, monkeypatch, capsys):
    """The whole recipe on a tiny model: progress bars for the evaluations and the training, checkpoints on the
    way, no FutureWarning from peft's ``is_gradient_checkpointing``; a run resumed from checkpoint-2 ends with
    the adapter of the uninterrupted run."""
    tok = word_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(recipe, "smollm2_checkpoint", lambda: model_dir)
    out = tmp_path / "out"
    argv = [
        *("--steps", "3", "--save-steps", "1", "--train-records", "6", "--eval-records", "2"),
        *("--max-length", "512", "--max-new-tokens", "2", "--threads", str(torch.get_num_threads())),
        *("--output-dir", str(out)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = recipe.main(argv)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    err = capsys.readouterr().err
    assert err.count("generating") >= 3 and "3/3 [" in err  # before, after, control; the training bar
    assert metrics["steps"] == 3 and metrics["resumed_from"] is None
    assert {"checkpoint-2", "checkpoint-3", "metrics_before.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint-1").exists()  # the last two kept

    uninterrupted = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-3")  # as if stopped after step 2
    resumed = recipe.main([*argv, "--resume"])
    assert resumed["resumed_from"] == str(out / "checkpoint-2") and resumed["steps"] == 3
    assert resumed["exact_match_before"] == metrics["exact_match_before"]  # read back, not recomputed
    assert "questions before training" not in capsys.readouterr().out
    after = load_file(out / "adapter_model.safetensors")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)

    shutil.rmtree(out)
    with pytest.raises(SystemExit, match="no checkpoint"):
        recipe.main([*argv, "--resume"])
