"""pytest-benchmark suite: the fused linear cross-entropy vs Liger, Cut CE, torch matmul + CE.

The cases, checks and timing are bench.gpu.micro's (see bench/conftest.py)."""

PART = "flce"


def test_loss(micro_item, micro_bench):
    micro_bench(micro_item)
