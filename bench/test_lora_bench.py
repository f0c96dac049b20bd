"""pytest-benchmark suite: the LoRA linear vs peft's layer.

The cases, checks and timing are bench.gpu.micro's (see bench/conftest.py)."""

PART = "lora"


def test_lora(micro_item, micro_bench):
    micro_bench(micro_item)
