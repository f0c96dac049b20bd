"""Triton kernels of ragkern (installed as ``ragkern.kernels``).

Each module holds its Triton kernels, one ``torch.autograd.Function`` and a plain PyTorch reference that is
also the CPU path. This package imports torch and triton only, never transformers or ``ragkern``.

The folder sits at the repository root, so Python started there (a script, a REPL, pytest) finds it as a
top-level ``kernels`` package, a name Hugging Face's ``kernels`` owns (transformers imports it). Imported under
that name, this file hands the import over to whatever ``kernels`` the interpreter would find without the
repository root on ``sys.path``, or fails as a user's import would: the root never shadows an installed package.
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in _saved if os.path.abspath(p or os.curdir) != _root]
    # the import system hands back whatever sys.modules holds under the name once this file has run
    del sys.modules[__name__]
    try:
        importlib.import_module(__name__)
    finally:
        sys.path[:] = _saved
else:
    from .attention import BlockTiles, block_tiles, varlen_attention
    from .cross_entropy import fused_linear_cross_entropy
    from .lora import lora_linear

    __all__ = ["BlockTiles", "block_tiles", "fused_linear_cross_entropy", "lora_linear", "varlen_attention"]
