"""The converted checkpoint is the GGUF model, plain; ragkern's labels under its real ChatML template."""

import json

import pytest
import torch

from ragkern.cli import main
from ragkern.data import encode
from ragkern.gguf import smollm2_gguf_path

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def target_text(ex, tokenizer) -> list[str]:
    """The decoded runs of consecutive target tokens (special tokens kept)."""
    runs, cur = [], []
    for t in ex["labels"] + [-100]:
        if t != -100:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


def test_checkpoint_is_plain_and_holds_the_gguf_weights(smollm2_path, smollm2_model, smollm2_tokenizer):
    import gguf

    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (smollm2_path / "model.safetensors").is_file()
    assert getattr(smollm2_model, "hf_quantizer", None) is None
    assert smollm2_model.lm_head.weight is smollm2_model.model.embed_tokens.weight
    tensors = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf_path())).tensors}
    layer = smollm2_model.model.layers[0]
    for name, param in [
        ("token_embd.weight", smollm2_model.model.embed_tokens.weight),  # Q8_0
        ("blk.0.ffn_down.weight", layer.mlp.down_proj.weight),  # Q4_1
        ("blk.0.attn_norm.weight", layer.input_layernorm.weight),  # F32
    ]:
        t = tensors[name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(param.detach(), expected.reshape(param.shape)), name
    tok = smollm2_tokenizer
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert SYSTEM in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_convert_gguf_command_errors_are_one_line(tmp_path, capsys):
    assert main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.gguf: file not found")
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["convert-gguf", str(tmp_path / "model.bin"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a GGUF file" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "out").mkdir()
    assert main(["convert-gguf", "smollm2", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_raft_labels_are_the_answer_and_im_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    record = {
        "question": "In which city was Orvela Tamsick born?",
        "passages": ["Orvela Tamsick was born in Lisbon.", "Brannic Vosswell played the harp."],
        "answer": "Lisbon",
    }
    ex = encode(record, tok)
    text = tok.decode(ex["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")  # the default system prompt is there...
    assert target_text(ex, tok) == ["Lisbon<|im_end|>"]  # ...and carries no loss
    passage_2 = [t for t, b in zip(ex["input_ids"], ex["block_ids"]) if b == 2]
    assert tok.decode(passage_2).strip() == "Brannic Vosswell played the harp."


def test_chat_labels_are_every_assistant_turn_and_im_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Crimson, a deep red."},
    ]
    ex = encode({"messages": messages}, tok)
    assert SYSTEM in tok.decode(ex["input_ids"])
    assert target_text(ex, tok) == ["Teal.<|im_end|>", "Crimson, a deep red.<|im_end|>"]
    own_system = encode({"messages": [{"role": "system", "content": "Be brief."}, *messages]}, tok)
    assert SYSTEM not in tok.decode(own_system["input_ids"])
    assert target_text(own_system, tok) == ["Teal.<|im_end|>", "Crimson, a deep red.<|im_end|>"]


@pytest.mark.parametrize("conversational", [False, True], ids=["strings", "messages"])
def test_prompt_completion_labels(smollm2_tokenizer, conversational):
    tok = smollm2_tokenizer
    if conversational:
        record = {
            "prompt": [{"role": "user", "content": "Capital of Peru?"}],
            "completion": [{"role": "assistant", "content": "Lima."}],
        }
        expected = ["Lima.<|im_end|>"]
    else:
        record = {"prompt": "The capital of Peru is", "completion": " Lima."}
        expected = [" Lima.<|im_end|>"]  # EOS is this tokenizer's <|im_end|>
    ex = encode(record, tok)
    assert target_text(ex, tok) == expected


def test_convert_gguf_command_writes_a_loadable_checkpoint(tmp_path, smollm2_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-bf16"
    assert main(["convert-gguf", str(smollm2_gguf_path()), str(out), "--dtype", "bfloat16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and getattr(model, "hf_quantizer", None) is None
    w = model.model.layers[3].self_attn.q_proj.weight
    assert torch.equal(w, smollm2_model.model.layers[3].self_attn.q_proj.weight.to(torch.bfloat16))
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
