"""Triton kernels of ragkern (installed as ``ragkern.kernels``).

Each module holds its Triton kernels, one ``torch.autograd.Function`` and a plain PyTorch reference that is
also the CPU path. This package imports torch and triton only, never transformers or ``ragkern``.
"""

from .attention import BlockTiles, block_tiles, varlen_attention
from .cross_entropy import fused_linear_cross_entropy
from .lora import lora_linear

__all__ = ["BlockTiles", "block_tiles", "fused_linear_cross_entropy", "lora_linear", "varlen_attention"]
