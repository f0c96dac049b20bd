"""pytest-benchmark suite: attention (varlen, passage blocks) vs SDPA, FlexAttention, torch varlen.

The cases, checks and timing are bench.gpu.micro's (see bench/conftest.py)."""

PART = "attention"


def test_attention(micro_item, micro_bench):
    micro_bench(micro_item)
