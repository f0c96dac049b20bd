"""bench/gpu/real.py (real weights in the GPU proof) and bench/gpu/shards.py (carrying them in parts): the
split / reassemble / sha256 round trip, a corrupt or missing part caught, the skip reason when the weights were
not carried, and every case's dry run on the CPU with the keys the JSON promises."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from bench.gpu import harness, real, shards


def _file(tmp_path: Path, size: int = 300_001) -> Path:
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + os.urandom(size))
    return src


def test_split_and_assemble_round_trip(tmp_path):
    src = _file(tmp_path)
    extra = tmp_path / "gguf-0.0-py3-none-any.whl"
    extra.write_bytes(b"a wheel")
    manifest = shards.split(src, tmp_path / "w", parts=3, extras=(extra,))
    assert [p["index"] for p in manifest["parts"]] == [1, 2, 3]
    assert sum(p["size"] for p in manifest["parts"]) == src.stat().st_size
    for i in (1, 2, 3):  # each folder travels alone: its part, the manifest and the extras
        assert {p.name for p in (tmp_path / "w" / f"p{i}").iterdir()} == {
            f"model.gguf.part{i}",
            shards.MANIFEST,
            extra.name,
        }
    out = shards.assemble(tmp_path / "w", tmp_path / "out" / "model.gguf")
    assert out.read_bytes() == src.read_bytes()
    assert shards.extra_path(tmp_path / "w", extra.name).read_bytes() == b"a wheel"
    assert shards.assemble(tmp_path / "w", out) == out  # an existing good copy is kept


def test_parts_arrive_in_separate_calls(tmp_path):
    """What a warm device machine holds after the first call (p1 only), then after the second."""
    src = _file(tmp_path)
    shards.split(src, tmp_path / "here", parts=2)
    there = tmp_path / "there"
    there.mkdir()
    (tmp_path / "here" / "p1").rename(there / "p1")
    st = shards.status(there)
    assert (st["present"], st["missing"], st["corrupt"]) == ([1], [2], [])
    assert "missing: p2" in shards.describe(st)
    with pytest.raises(shards.ShardError) as e:
        shards.assemble(there, tmp_path / "x")
    assert e.value.missing == [2] and not (tmp_path / "x").exists()
    (tmp_path / "here" / "p2").rename(there / "p2")
    assert shards.assemble(there, tmp_path / "x").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_part_detected(tmp_path, damage):
    src = _file(tmp_path)
    m = shards.split(src, tmp_path / "w", parts=3)
    part = tmp_path / "w" / "p2" / m["parts"][1]["name"]
    data = part.read_bytes()
    part.write_bytes(data[:50] + bytes([data[50] ^ 0x10]) + data[51:] if damage == "flip" else data[:-1])
    with pytest.raises(shards.ShardError) as e:
        shards.assemble(tmp_path / "w", tmp_path / "out")
    assert e.value.corrupt == [2] and "CORRUPT" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_shards_command_line(tmp_path, capsys):
    src = _file(tmp_path)
    assert shards.main(["split", str(src), str(tmp_path / "w"), "--parts", "2"]) == 0
    assert shards.main(["status", str(tmp_path / "w")]) == 0
    (tmp_path / "w" / "p2" / "model.gguf.part2").unlink()
    assert shards.main(["status", str(tmp_path / "w")]) == 1
    assert shards.main(["status", str(tmp_path / "w"), "--partial-ok"]) == 0  # between two device calls
    assert "missing: p2" in capsys.readouterr().out
    assert shards.main(["assemble", str(tmp_path / "w"), str(tmp_path / "o")]) == 1
    (tmp_path / "w" / "p1" / "model.gguf.part1").write_bytes(b"GGUF?")
    assert shards.main(["status", str(tmp_path / "w"), "--partial-ok"]) == 2  # corrupt: never ok


@pytest.fixture
def no_state(monkeypatch):
    monkeypatch.setattr(real, "_STATE", {})


def _cpu(mode: str) -> harness.Ctx:
    return harness.Ctx(device=torch.device("cpu"), mode=mode)


def test_cases_skip_with_the_reason_when_weights_missing(tmp_path, monkeypatch, no_state):
    monkeypatch.setattr(real, "WEIGHTS", tmp_path / "weights")  # nothing carried
    ctx = _cpu("quick")
    cases = real.plan(ctx)  # starts the background conversion, which finds no weights
    for name, fn, kwargs, _ in cases:
        out = fn(ctx, **kwargs)
        assert out["status"] == "skipped", name
        assert "weights not carried" in out["reason"] and "bench/gpu/weights.sh" in out["reason"], name
        assert "bench/gpu/weights/p1" in out["reason"] and "bench/gpu/weights/p2" in out["reason"], name


def test_one_part_carried_names_the_missing_one(tmp_path, monkeypatch, no_state):
    shards.split(_file(tmp_path), tmp_path / "here", parts=2)
    (tmp_path / "weights").mkdir()
    (tmp_path / "here" / "p1").rename(tmp_path / "weights" / "p1")
    monkeypatch.setattr(real, "WEIGHTS", tmp_path / "weights")
    out = real.weights_case(_cpu("full"))
    assert out["status"] == "skipped" and "missing: p2" in out["reason"]


def test_corrupt_weights_are_an_error_not_a_skip(tmp_path, monkeypatch, no_state):
    m = shards.split(_file(tmp_path), tmp_path / "weights", parts=2)
    (tmp_path / "weights" / "p1" / m["parts"][0]["name"]).write_bytes(b"GGUF broken")
    monkeypatch.setattr(real, "WEIGHTS", tmp_path / "weights")
    record: dict = {}
    part = harness.Part("real", _cpu("quick"), 60, float("inf"), record)
    for name, fn, kwargs, _ in real.plan(_cpu("quick"))[:2]:
        entry = part.case(name, fn, **kwargs)
        assert entry["status"] == "error" and "CORRUPT" in entry["error"] and "p1" in entry["error"], name


def test_plan_order_and_sizes(tmp_path, monkeypatch, no_state):
    monkeypatch.setattr(real, "WEIGHTS", tmp_path / "weights")  # planning on a device starts the conversion
    for mode in ("dry-run", "quick", "full"):
        cases = real.plan(_cpu(mode), peak_tflops=989.0)
        names = [c[0] for c in cases]
        assert names == ["real weights", "real parity", "real raft lora", "real long 32k", "real long 64k"]
        assert all(callable(fn) and isinstance(kw, dict) for _, fn, kw, _ in cases)
        parity = cases[1][2]
        if mode != "dry-run":
            assert parity["steps"] >= 200  # the ">= 200 bf16 steps"
            assert [c[2]["tokens"] for c in cases[3:]] == [32768, 65536]


@pytest.mark.slow
def test_dry_run_cases_produce_their_keys(dry_run):
    """Every case on the CPU (tiny SmolLM2-shaped model, few steps), from the session's dry run of every part:
    the parity sides train the same bins in the same order, so their per-step losses agree closely; RAFT gives
    an exact match per side; the long rows train with block attention."""
    out = dry_run[1]["parts"]["real"]["cases"]
    assert {n: o.get("status", "ok") for n, o in out.items()} == dict.fromkeys(out, "ok"), out

    w = out["real weights"]
    assert w["round_trip_sha256_ok"] and w["corrupt_detected"] == [2] and w["missing_detected"] == [3]

    p = out["real parity"]
    steps = p["steps"]
    for side in ("ragkern", "peer"):
        assert len(p[side]["losses"]) == steps and p[side]["tokens_per_s"] > 0
        assert p[side]["steps"] == steps and p[side]["heldout_loss"] > 0
    assert p["steps_compared"] == steps and p["ragkern"]["tokens"] == p["peer"]["tokens"]
    assert 0 <= p["max_abs_loss_diff"] < 0.05 and p["mean_abs_loss_diff"] <= p["max_abs_loss_diff"]
    assert set(p["final_heldout_loss"]) == {"ragkern", "peer"}
    assert abs(p["final_heldout_loss"]["ragkern"] - p["final_heldout_loss"]["peer"]) < 0.05
    assert p["peer"]["losses"][0] == pytest.approx(p["ragkern"]["losses"][0], abs=0.02)

    r = out["real raft lora"]
    for side in ("ragkern", "peer"):
        assert 0.0 <= r[side]["exact_match"] <= 1.0 and r[side]["tokens_per_s"] > 0
    assert r["ragkern"]["tokens"] == r["peer"]["tokens"] and r["speedup_tokens_per_s"] > 0

    for name, tokens in (("real long 32k", 32768), ("real long 64k", 65536)):
        long = out[name]
        assert long["row_tokens"] == tokens // 64 and long["block_attention"]
        assert long["passages_per_example"] > 1
        assert all(0.5 * long["row_tokens"] < n <= long["row_tokens"] for n in long["example_tokens"])
        assert long["plain"]["tokens_per_s"] > 0 and "oom" not in long["plain"]


def test_planning_converts_in_the_background(tmp_path, monkeypatch, no_state):
    """Planning on a device assembles and converts the weights in a thread; the weights case then reports what
    was converted (here a stand-in for convert_gguf that writes the files it would)."""
    src = _file(tmp_path)
    shards.split(src, tmp_path / "weights", parts=2)
    monkeypatch.setattr(real, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setattr(real.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf.read_bytes() == src.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama", "hidden_size": 576}')
        (out / "gguf_source.json").write_text('{"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}')

    monkeypatch.setattr(real, "_convert", fake_convert)
    real.plan(_cpu("quick"))
    for thread in threading.enumerate():
        if thread.name == "real-weights":
            thread.join(60)
    out = real.weights_case(_cpu("quick"))
    assert calls == [True]  # converted once, from the reassembled file
    assert out.get("status", "ok") == "ok"
    assert out["background"] and not out["cached"] and out["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert out["config"]["hidden_size"] == 576 and out["gguf_sha256"] == shards.sha256_file(src)
