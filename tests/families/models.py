"""Tiny random models of the supported families, built from their config classes (nothing is downloaded).

Each has a sliding window of ``WINDOW`` tokens where the family has one (all layers for Mistral and Phi-3; the
model's own pattern of sliding and full layers for Qwen2/3 and Gemma 2/3), Gemma 2's attention and final logit
soft-capping, and the family's head layout (GQA, qkv biases, q/k norms, fused qkv). ``LENGTHS`` holds examples
up to four windows long, so every windowed layer cuts keys off.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ragkern  # noqa: F401  (registers the "ragkern" attention)

WINDOW = 8
LENGTHS = (33, 6, 27, 1, 17)  # one packed row: examples longer and shorter than the window, one of 1 token
VOCAB = 96

_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]

# family -> (model_type, config overrides)
FAMILIES = {
    "llama3": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=500000.0)),
    "qwen2.5": (
        "qwen2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,  # layers from 1 on slide (Qwen2's layout)
        ),
    ),
    "qwen3": (
        "qwen3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        ),
    ),
    "gemma2": (
        "gemma2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=_SLIDING_FULL_SLIDING,
            attn_logit_softcapping=5.0,  # small caps so tanh bends the scores and the logits
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=_SLIDING_FULL_SLIDING,
            query_pre_attn_scalar=16,
        ),
    ),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW)),
    "phi3": ("phi3", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW)),
}


def family_model(family: str, attn: str = "ragkern", seed: int = 0) -> torch.nn.Module:
    """The family's tiny model in fp32, eval mode; the same ``seed`` gives the same weights whatever ``attn``."""
    model_type, overrides = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**_SIZES, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def examples(lengths=LENGTHS, seed: int = 0, answer_tail: int | None = None) -> list[dict]:
    """Random token examples; labels on every token, or on the last ``answer_tail`` tokens only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        tail = n if answer_tail is None else min(answer_tail, n)
        out.append({"input_ids": ids, "labels": [-100] * (n - tail) + ids[n - tail :]})
    return out
