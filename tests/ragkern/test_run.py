"""`ragkern train`: the example configs train end to end; flags override the file; bad options name themselves."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from ragkern.cli import main
from ragkern.run import ConfigError, parse_train_args, run_train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a shared 2-core machine more threads mostly wait
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["dap", "raft", "hybrid"])
def test_example_config_trains_and_writes_a_model(name, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(ROOT)  # the configs' data paths are relative to the repository root
    out = tmp_path / name
    flags = ["--max_steps", "2", "--output_dir", str(out), "--logging_steps", "1", "--disable_tqdm", "true"]
    run = run_train(*parse_train_args(["--config", f"examples/configs/{name}.yaml", *flags]))
    assert run.trainer.state.global_step == 2
    assert run.stats.examples > 0 and "train_loss" in run.metrics
    summary = json.loads((out / "ragkern_run.json").read_text())
    assert summary["encoding"]["examples"] == run.stats.examples
    assert AutoTokenizer.from_pretrained(out).get_vocab() == run.trainer.processing_class.get_vocab()
    trained = run.trainer.model
    if name == "raft":  # LoRA: the adapter, and the random base it was trained on
        loaded = AutoPeftModelForCausalLM.from_pretrained(out)
        key = next(k for k in trained.state_dict() if "lora_B" in k)
        assert trained.state_dict()[key].abs().sum() > 0  # trained away from its zero init
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out)
        key = "model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[key], trained.state_dict()[key].cpu())
    if name == "hybrid":  # three sources mixed, each tagged
        assert set(run.stats.per_source) == {"raft", "chat", "dap"}


def _config(tmp_path, **values) -> str:
    base = {
        "model_config": "llama",
        "tokenizer_name_or_path": "word",
        "sources": [{"kind": "qa", "path": str(DATA / "qa.jsonl"), "corpus": str(DATA / "corpus.jsonl")}],
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**base, **values}))
    return str(path)


def test_flags_override_the_config_file(tmp_path):
    config = _config(
        tmp_path, learning_rate=0.01, num_distractors=2, lora_r=4, max_length=300, weight_decay="1e-2"
    )
    model, data, train = parse_train_args(
        ["--config", config, "--learning_rate", "1e-3", "--num_distractors", "1", "--lora_r", "0"]
    )
    assert (train.learning_rate, data.num_distractors, model.lora_r) == (1e-3, 1, 0)  # flags win
    assert train.max_length == 300 and model.model_config == "llama"  # the file's other options hold
    assert train.weight_decay == 0.01  # YAML reads 1e-2 as a string: converted as a flag would be
    dap = json.dumps([{"kind": "dap", "path": str(DATA / "dap.jsonl"), "weight": 2}])
    _, data, _ = parse_train_args(["--config", config, "--sources", dap])
    assert [(s.kind, s.name, s.weight) for s in data.sources] == [("dap", "dap", 2.0)]


def test_flags_alone_without_a_config_file(tmp_path):
    sources = json.dumps([{"kind": "raft", "path": str(DATA / "raft.jsonl")}])
    model, data, train = parse_train_args(
        ["--model_config", "qwen3", "--tokenizer_name_or_path", "word", "--sources", sources]
        + ["--output_dir", str(tmp_path), "--negatives", "bm25", "--lora_r", "8", "--lora_target_modules"]
        + ["q_proj", "v_proj"]
    )
    assert (model.model_config, data.negatives, model.lora_target_modules) == (
        "qwen3",
        "bm25",
        ["q_proj", "v_proj"],
    )
    assert data.sources[0].name == "raft"


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "raftt", "path": "x"}, r"sources\[0\]: kind 'raftt' is not one of raft, qa, instruct, dap"),
        ({"path": "x"}, r"sources\[0\]: missing field 'kind'"),
        ({"kind": "instruct", "name": "chat"}, r"sources\[0\] \(chat\): missing field 'path'"),
        ({"kind": "qa", "path": "QA"}, r"sources\[0\] \(qa\): kind 'qa' needs field 'corpus'"),
        ({"kind": "dap", "paht": "x"}, r"sources\[0\]: unknown field 'paht'; did you mean 'path'\?"),
        (
            {"kind": "dap", "path": "missing.jsonl"},
            r"sources\[0\] \(dap\): field 'path': 'missing.jsonl' is not a file",
        ),
        (
            {"kind": "dap", "path": "DAP", "weight": -1},
            r"sources\[0\] \(dap\): field 'weight' must be a number >= 0",
        ),
    ],
)
def test_bad_source_names_the_source_and_field(tmp_path, source, message):
    source = {
        k: str(DATA / "qa.jsonl") if v == "QA" else str(DATA / "dap.jsonl") if v == "DAP" else v
        for k, v in source.items()
    }
    with pytest.raises(ConfigError, match=message):
        parse_train_args(["--config", _config(tmp_path, sources=[source])])


def test_bad_options_name_themselves(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'lerning_rate'; did you mean 'learning_rate'\?"):
        parse_train_args(["--config", _config(tmp_path, lerning_rate=0.1)])
    with pytest.raises(ConfigError, match="exactly one of model_name_or_path"):
        parse_train_args(["--config", _config(tmp_path, model_config=None)])
    with pytest.raises(ConfigError, match="negatives = 'bm26' is not one of random, bm25"):
        parse_train_args(["--config", _config(tmp_path, negatives="bm26")])
    mix = [
        {"kind": "qa", "path": str(DATA / "qa.jsonl"), "corpus": str(DATA / "corpus.jsonl")},
        {"kind": "dap", "path": str(DATA / "dap.jsonl")},
    ]
    with pytest.raises(ConfigError, match="resample_every_epoch re-draws .* single qa source"):
        parse_train_args(["--config", _config(tmp_path, sources=mix, resample_every_epoch=True)])


@pytest.mark.parametrize(
    "sources, message",
    [
        ([{"kind": "raft", "path": str(DATA / "raft.jsonl")}], r"has one raft source \(raft\)"),
        ([{"kind": "dap", "path": str(DATA / "dap.jsonl")}], r"has one dap source \(dap\)"),
        (
            [
                {"kind": "dap", "path": str(DATA / "dap.jsonl")},
                {"kind": "raft", "path": str(DATA / "raft.jsonl")},
            ],
            "mixes 2 sources",
        ),
    ],
)
def test_resample_every_epoch_without_a_single_qa_source_is_refused(tmp_path, sources, message):
    config = _config(tmp_path, sources=sources, resample_every_epoch=True)
    with pytest.raises(
        ConfigError, match=f"single qa source.*this run {message}.*set resample_every_epoch false"
    ):
        parse_train_args(["--config", config])
    parse_train_args(
        ["--config", _config(tmp_path, resample_every_epoch=True)]
    )  # the one qa source of _config


def test_checkpoint_loads_in_float32_unless_another_dtype_is_asked(tmp_path, caplog):
    """A bf16 checkpoint: float32 by default (fp32 master weights), its dtype only with model_dtype auto."""
    from ragkern import RagTrainingArguments
    from ragkern.run import ModelArguments, _build_model
    from tests.ragkern.tiny import tiny_model, word_tokenizer

    tok = word_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    args = RagTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    loaded = {}
    for dtype in (None, "float32", "auto", "bfloat16"):
        extra = {} if dtype is None else {"model_dtype": dtype}
        model_args = ModelArguments(model_name_or_path=str(tmp_path / "ckpt"), **extra)
        caplog.clear()
        with caplog.at_level("INFO", logger="ragkern.run"):
            loaded[dtype] = _build_model(model_args, tok, args).dtype
        assert f"model weights in {loaded[dtype]}" in caplog.text
        assert ("no fp32 master weights" in caplog.text) == (loaded[dtype] != torch.float32)
    assert loaded == {
        None: torch.float32,
        "float32": torch.float32,
        "auto": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    config = _config(tmp_path, sources=[{"kind": "dapp", "path": "x"}])
    assert main(["train", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkern train: error: sources[0]: kind 'dapp'") and "Traceback" not in err


def test_cli_train_help_leads_with_config_and_names_real_options(capsys):
    import re

    from ragkern.cli import TRAIN_HELP
    from ragkern.run import ARGUMENT_CLASSES

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text == TRAIN_HELP + "\n" and text.splitlines()[0].startswith("usage: ragkern train --config")
    assert len(text.splitlines()) < 50
    fields = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    named = set(re.findall(r"--(\w+)", TRAIN_HELP)) - {"config", "help", "option"}
    assert named and named <= fields, named - fields  # the short help cannot name an option that is gone
    with pytest.raises(SystemExit) as e:
        main(["train", "--help-all"])
    assert e.value.code == 0
    full = capsys.readouterr().out
    for option in ("--sources", "--lora_r", "--num_distractors", "--max_length", "--adam_beta1"):
        assert option in full


def test_data_knobs_shape_the_mixed_records(tmp_path):
    from ragkern.run import _load_sources, _records_for_epoch

    sources = [
        {"kind": "qa", "path": str(DATA / "qa.jsonl"), "corpus": str(DATA / "corpus.jsonl")},
        {"kind": "instruct", "name": "chat", "path": str(DATA / "instruct.jsonl")},
    ]
    values = dict(sources=sources, p_oracle=0.5, reasoning=False, split_oracle_source=True, num_distractors=2)
    _, data, _ = parse_train_args(["--config", _config(tmp_path, **values), "--num_records", "40"])
    loaded = _load_sources(data, seed=0)
    assert any(
        "reasoning" in r for r in loaded[0].records
    )  # the data has reasoning: reasoning=False drops it
    epoch0 = _records_for_epoch(loaded, data, 0, epoch=0)
    assert len(epoch0) == 40 and not any("reasoning" in r for r in epoch0)
    assert {r["source"] for r in epoch0} == {"raft/oracle", "raft/no_oracle", "chat"}
    raft = [r for r in epoch0 if r["source"].startswith("raft")]
    assert all(len(r["passages"]) == 3 for r in raft)  # 2 distractors + the oracle, or 3 distractors
    assert _records_for_epoch(loaded, data, 0, epoch=0) == epoch0  # deterministic
    assert _records_for_epoch(loaded, data, 0, epoch=1) != epoch0
