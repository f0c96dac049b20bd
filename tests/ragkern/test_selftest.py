import json

import pytest

from ragkern.cli import main
from ragkern.selftest import small_config


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])  # gemma2: sliding window, soft-capping
def test_selftest_passes_on_shipped_architectures(arch, capsys):
    assert main(["selftest", "--config", arch]) == 0
    out = capsys.readouterr().out
    assert "PASS  packing equivalence" in out and "PASS  no leakage" in out


def test_selftest_reads_a_user_config_and_keeps_its_attention_shape(tmp_path, capsys):
    cfg = {
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "sliding_window": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    small = small_config(str(tmp_path))
    assert small.num_attention_heads // small.num_key_value_heads == 4 and small.hidden_size == 64
    assert main(["selftest", "--config", str(tmp_path / "config.json")]) == 0


def test_selftest_fails_with_the_reason_on_unsupported_models(capsys):
    assert main(["selftest", "--config", "gpt_oss"]) == 1  # attention sinks
    out = capsys.readouterr().out
    assert "FAIL  packing equivalence" in out and "s_aux" in out


def test_selftest_model_checks_a_saved_checkpoint(tmp_path, capsys):
    from tests.ragkern.tiny import tiny_model

    tiny_model("qwen3", vocab_size=64).save_pretrained(tmp_path / "ckpt")
    assert main(["selftest", "--model", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "PASS  packing equivalence" in out and "float64 one-by-one reference" in out
    assert "PASS  no leakage" in out
