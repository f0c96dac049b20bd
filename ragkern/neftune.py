"""NEFTune (noisy embeddings, https://huggingface.co/papers/2310.05914) on packed rows, scaled per example.

``Trainer`` adds ``uniform(-a, a)`` noise to the input embeddings with ``a = alpha / sqrt(L * d)``, ``L`` the
row's length and ``d`` the hidden size. A packed row holds several examples, so ``L`` must be each example's
length, or a row of four examples gets half the noise each would get alone::

    row          a0 a1 a2 b0 b1        (cu_seqlens [0, 3, 5])
    noise bound  alpha/sqrt(3d) x3  alpha/sqrt(2d) x2
"""

from __future__ import annotations

import torch


def neftune_noise(embeds: torch.Tensor, alpha: float, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``embeds`` ``(B, T, d)`` plus NEFTune noise: per example of a packed row when ``cu_seqlens``
    (``(n + 1,)`` offsets of the examples of a ``(1, T)`` row) is given, else per row as ``Trainer`` does."""
    B, T, d = embeds.shape
    if cu_seqlens is None or B != 1 or int(cu_seqlens[-1]) != T:
        bound = alpha / (T * d) ** 0.5
        return embeds + torch.zeros_like(embeds).uniform_(-bound, bound)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(embeds.device, torch.long)
    bound = alpha / (lengths.to(torch.float32) * d).sqrt()  # (n,)
    per_token = torch.repeat_interleave(bound, lengths).to(embeds.dtype)  # (T,)
    return embeds + torch.zeros_like(embeds).uniform_(-1, 1) * per_token[None, :, None]


class PackedNEFTune:
    """A forward hook on a model's input embeddings that adds :func:`neftune_noise` in training mode, per
    example of the row whose ``cu_seqlens`` the trainer set last (per row when it set None)."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.cu_seqlens: torch.Tensor | None = None
        self._handle = None

    def attach(self, model: torch.nn.Module) -> None:
        """Hook ``model``'s input embeddings (a peft model's base embeddings), replacing an earlier hook."""
        self.detach()
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, inputs, output):
        if not module.training:
            return output
        return neftune_noise(output, self.alpha, self.cu_seqlens)
