"""Fast tokenizers built offline, for the demo, tests, benchmarks and self-checks (no hub download)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# A small chat template in the usual shape: role header, content, end-of-turn token. The end-of-turn token
# after the assistant's content is a training target (the model must learn to stop).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_word_tokenizer(
    words: Iterable[str], *, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Build a fast word-level tokenizer whose vocabulary is the special tokens, ``words`` and punctuation.

    Text is split on whitespace and punctuation; unknown words map to ``<unk>``. Offsets are exact, so the
    tokenizer works with :func:`ragkern.data.encode`. ``chat_template=None`` gives a tokenizer without one
    (``encode`` then uses its plain template).
    """
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", *"0123456789", *words]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (like real LLM tokenizers, tokens merge across the spaces between
    words), with the special tokens of :func:`build_word_tokenizer` and the same chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
