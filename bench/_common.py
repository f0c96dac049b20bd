"""Shared by the benchmarks: machine/version/git metadata and writing results as JSON under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict:
    """Where and with what a benchmark ran."""
    import torch

    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_sha": _git_sha(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__  # what the kernels compile with
    except ImportError:
        meta["triton"] = None
    try:
        import transformers

        import ragkern

        meta["transformers"] = transformers.__version__
        meta["ragkern"] = ragkern.__version__
    except ImportError:
        pass
    return meta


def write_results(name: str, results: dict) -> Path:
    """Write ``{"meta": ..., **results}`` to ``bench/results/<name>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": metadata(), **results}, indent=2) + "\n")
    return path


def add_training_flags(p) -> None:
    """The flags of the :func:`train_lora_steps` recipe and its RAFT data, shared by the benchmarks that train."""
    p.add_argument(
        "--steps", type=int, default=30, help="optimizer steps per trained arm (one packed row each)"
    )
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--p-oracle", type=float, default=0.8, help="share of training examples with the oracle")
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=16)


def train_lora_steps(model, tokenizer, records, *, steps: int, seed: int, args, output_dir) -> dict:
    """``steps`` RagTrainer optimizer steps (one packed row of ``args.max_length`` tokens each, cosine schedule,
    10% warmup, fused LoRA, CPU, no checkpoints) of ``model`` on ``records``; returns seconds, tokens and steps.
    ``args`` gives ``max_length`` and ``learning_rate`` (the strategies and synth benchmarks share this recipe)."""
    from ragkern import RagTrainer, RagTrainingArguments

    targs = RagTrainingArguments(
        output_dir=str(output_dir),
        max_length=args.max_length,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        fused_lora=True,
        seed=seed,
        use_cpu=True,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = RagTrainer(model=model, args=targs, train_dataset=records, processing_class=tokenizer)
    t0 = time.perf_counter()
    result = trainer.train()
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "tokens": result.metrics.get("train_tokens") or 0,
        "steps": steps,
    }
