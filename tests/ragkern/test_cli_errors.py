"""One error style for the whole CLI: an ordinary mistake is one line on stderr and exit status 2, the
traceback only with --debug; help is fast (no torch / transformers import)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragkern.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"ragkern {argv[0]}: error: ")
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize(
    "value,expected",
    [
        ("LlamaForCausalLM", "the class of model type 'llama': --config llama"),
        ("meta-llama/Llama-3.2-1B", "looks like a hub id"),
        ("./configs/missing/config.json", "no such file or folder"),
        ("qwen", "did you mean"),
    ],
)
def test_selftest_config_mistakes(capsys, value, expected):
    one_line_error(capsys, ["selftest", "--config", value], expected)


def test_selftest_on_a_config_whose_token_ids_exceed_the_small_vocabulary(capsys):
    """phi3's pad_token_id is 32000: the shrunken model's ids must fit its vocabulary."""
    assert main(["selftest", "--config", "phi3"]) == 0
    assert capsys.readouterr().out.count("PASS") == 2


def test_pack_stats_and_eval_mistakes(capsys, tmp_path):
    one_line_error(
        capsys, ["pack-stats", "missing.jsonl", "--tokenizer", "x", "--max-length", "64"], "no such file"
    )
    one_line_error(
        capsys,
        ["pack-stats", str(DATA / "raft.jsonl"), "--tokenizer", "./no/tokenizer", "--max-length", "64"],
        "--tokenizer './no/tokenizer': no such folder",
    )
    one_line_error(
        capsys, ["eval", "--model", "x", "--data", "missing.jsonl"], "--data 'missing.jsonl': no such file"
    )
    one_line_error(
        capsys,
        ["eval", "--model", "x", "--data", str(DATA / "dap.jsonl")],
        "a dap record where raft records are expected",
    )
    one_line_error(
        capsys, ["eval", "--model", "runs/raft/model", "--data", str(DATA / "raft.jsonl")], "no such folder"
    )


def test_debug_shows_the_traceback():
    from ragkern.cli import CliError

    with pytest.raises(CliError, match="neither a config.json path nor a model type"):
        main(["selftest", "--config", "LlamaForCausalLM", "--debug"])


def test_unexpected_errors_say_so_and_point_to_debug(capsys, monkeypatch):
    import ragkern.selftest

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(ragkern.selftest, "run_selftest", broken)
    assert main(["selftest", "--config", "llama"]) == 1
    err = capsys.readouterr().err
    assert err == "ragkern selftest: error: unexpected RuntimeError: boom (--debug shows the traceback)\n"


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from ragkern.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: ragkern" in out and out.strip().splitlines()[-1] == "[]"


def test_import_ragkern_still_registers_the_attention():
    code = (
        "import ragkern, sys; assert 'transformers' not in sys.modules\n"
        "from transformers import AttentionInterface\n"
        "print('ragkern' in AttentionInterface._global_mapping)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_a_lora_run_evaluates_from_another_folder(tmp_path, monkeypatch, capsys):
    """The adapter names its base model by an absolute path, so `ragkern eval` works from anywhere."""
    monkeypatch.chdir(tmp_path)
    flags = [
        "--model_config", "llama", "--tokenizer_name_or_path", "word", "--lora_r", "4",
        "--sources", json.dumps([{"kind": "raft", "path": str(DATA / "raft.jsonl")}]),
        "--output_dir", "runs/lora", "--max_steps", "1", "--max_length", "512", "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(["train", *flags]) == 0
    run_dir = tmp_path / "runs" / "lora"
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_absolute()
    assert "training" in json.loads((run_dir / "ragkern_run.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    args = ["eval", "--model", str(run_dir), "--data", str(DATA / "raft.jsonl"), "--max-new-tokens", "2"]
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("split               count      EM      F1")


RAFT_SOURCES = json.dumps([{"kind": "raft", "path": str(DATA / "raft.jsonl")}])
TRAIN_FLAGS = ["--sources", RAFT_SOURCES, "--output_dir", "out", "--max_steps", "1", "--use_cpu", "true"]


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_train_says_a_local_model_folder_does_not_exist(capsys, tmp_path, monkeypatch, how):
    """Not huggingface_hub's "Repo id must be in the form ..." error: the path, resolved, and what to give."""
    monkeypatch.chdir(tmp_path)
    if how == "flag":
        argv = ["train", "--model_name_or_path", "./no/such/folder", *TRAIN_FLAGS]
    else:
        (tmp_path / "run.yaml").write_text("model_name_or_path: ./no/such/folder\n")
        argv = ["train", "--config", "run.yaml", *TRAIN_FLAGS]
    err = one_line_error(
        capsys,
        argv,
        f"model_name_or_path './no/such/folder': no such folder ({tmp_path / 'no' / 'such' / 'folder'})",
        "a local checkpoint folder (one holding config.json",
        "or a hub id such as org/name",
    )
    assert "Repo id" not in err


def test_train_says_a_local_tokenizer_folder_does_not_exist(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model_config", "llama", "--tokenizer_name_or_path", "../tok", *TRAIN_FLAGS]
    one_line_error(
        capsys,
        argv,
        f"tokenizer_name_or_path '../tok': no such folder ({tmp_path.parent / 'tok'})",
        "a local tokenizer folder",
        "or 'word'",
    )


@pytest.mark.parametrize("hub_id", ["gpt2", "Qwen/Qwen2.5-0.5B"])
def test_a_hub_id_is_left_to_from_pretrained(hub_id, tmp_path, monkeypatch):
    from ragkern.run import ModelArguments

    monkeypatch.chdir(tmp_path)
    args = ModelArguments(model_name_or_path=hub_id, tokenizer_name_or_path=hub_id)
    assert (args.model_name_or_path, args.tokenizer_name_or_path) == (hub_id, hub_id)


def test_a_model_folder_under_home_is_found(tmp_path, monkeypatch):
    """YAML values reach from_pretrained unexpanded by a shell, and transformers reads ~/x as a repo id."""
    from ragkern.run import ModelArguments

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    assert ModelArguments(model_name_or_path="~/ckpt").model_name_or_path == str(tmp_path / "ckpt")


def test_train_says_the_model_folder_holds_no_tokenizer(capsys, tmp_path, monkeypatch):
    """Not "You need to have sentencepiece or tiktoken installed": the folder, and the option that fixes it."""
    from tests.ragkern.tiny import tiny_model

    monkeypatch.chdir(tmp_path)
    tiny_model("llama", attn="sdpa").save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()  # save_pretrained's progress bar
    err = one_line_error(
        capsys,
        ["train", "--model_name_or_path", "ckpt", *TRAIN_FLAGS],
        f"model_name_or_path 'ckpt': the folder {tmp_path / 'ckpt'} holds no tokenizer",
        "set tokenizer_name_or_path",
    )
    assert "sentencepiece" not in err
