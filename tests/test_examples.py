"""examples/train.py runs end to end on a tiny local model (as a user would launch it)."""

import json
import subprocess
import sys
from pathlib import Path

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
