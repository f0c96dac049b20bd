"""What a fresh install sees: the repository root never shadows an installed package, and a CPU install without
triton trains on the PyTorch paths. Each test starts a fresh interpreter in the repository root, as a user's
script, REPL or ``python -c`` would be started there (the root is then first on ``sys.path``)."""

import subprocess
import sys
import textwrap

import pytest

from tests.test_readme import ROOT


def run_in_root(code: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_hub_kernels_transformers_and_peft_import_from_the_repo_root():
    pytest.importorskip(
        "kernels", reason="Hugging Face's kernels package is not installed (the test extra has it)"
    )
    result = run_in_root("""
        import os, sys
        import transformers.integrations.hub_kernels  # imports Hugging Face's kernels (transformers >= 5.25)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig
        import kernels

        root = os.path.abspath(os.curdir)
        assert sys.path[0] in ("", root), sys.path[:2]  # the situation that used to shadow
        ours = os.path.join(root, "kernels")
        assert os.path.dirname(os.path.abspath(kernels.__file__)) != ours, kernels.__file__
        assert hasattr(kernels, "CUDAProperties") and hasattr(kernels, "get_kernel")
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules="all-linear"))
        import ragkern.kernels
        assert ragkern.kernels.__file__ == os.path.join(ours, "__init__.py")
        print("ok", kernels.__file__)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def test_the_kernels_folder_fails_like_a_missing_package():
    # -S: no site-packages, so no `kernels` is installed; the folder in the root must not stand in for one
    result = run_in_root(
        """
        import sys
        try:
            import kernels
        except ModuleNotFoundError as e:
            assert e.name == "kernels" and "kernels" not in sys.modules
            print("missing")
        """,
        "-S",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "missing"


def test_the_kernels_folder_hands_over_to_the_installed_package(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    (fake / "layer.py").write_text("WHAT = 'submodule'\n")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    result = run_in_root(
        "import kernels, kernels.layer; print(kernels.WHO, kernels.layer.WHAT, kernels.__file__)",
        "-S",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["installed", "submodule", str(fake / "__init__.py")]


def test_a_cpu_install_without_triton_trains_on_the_pytorch_paths():
    # sys.modules["triton"] = None makes every `import triton` raise ImportError, as on an install without it
    result = run_in_root("""
        import sys
        sys.modules["triton"] = None
        import torch
        from peft import LoraConfig
        from transformers import LlamaConfig, AutoModelForCausalLM
        from ragkern import RagTrainer, RagTrainingArguments
        from ragkern.data.tokenizer import build_word_tokenizer
        import ragkern.kernels.attention as attention

        assert attention.triton is None
        texts = [f"record {i} says the value is {i * 7}" for i in range(8)]
        tokenizer = build_word_tokenizer(texts)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = AutoModelForCausalLM.from_config(config)
        args = RagTrainingArguments(output_dir="/tmp/ragkern-no-triton", max_length=64, max_steps=2,
                                    per_device_train_batch_size=1, report_to=[], save_strategy="no",
                                    disable_tqdm=True, use_cpu=True)
        trainer = RagTrainer(model=model, args=args, train_dataset=[{"text": t} for t in texts],
                             processing_class=tokenizer, peft_config=LoraConfig(r=2, target_modules="all-linear"))
        trainer.train()
        assert trainer.state.global_step == 2 and "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        print("trained", trainer.state.log_history[-1]["train_loss"])
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("trained")
