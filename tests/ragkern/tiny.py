"""Tiny models, tokenizers and examples for tests, built from configs (nothing is downloaded)."""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import ragkern  # noqa: F401  (registers the "ragkern" attention)
from ragkern import PackingCollator
from ragkern.data import build_word_tokenizer

WORDS = (
    "the a capital of is in was born city river mountain who what where when which paris berlin rome madrid "
    "france germany italy spain lives works river alpha beta gamma delta question answer passages title"
).split()

# Small shapes, GQA where the family has it; head_dim kept small so CPU tests are fast.
TINY = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "gemma": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=16),
}


def tiny_model(
    family: str = "llama", vocab_size: int = 64, seed: int = 0, attn: str = "ragkern", **overrides
):
    from transformers import AutoConfig

    spec = dict(TINY[family])
    model_type = spec.pop("model_type")
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**sizes, **spec, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


LEAKY = "leaky_causal"


def _leaky_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention over the whole row, blind to packing boundaries: a deliberately wrong attention that
    the invariant checks must catch. q ``(B, Hq, T, D)``, k/v ``(B, Hkv, T, D)`` -> ``(B, T, Hq, D)``."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2), None


def leaky_model(family: str = "llama", **kwargs):
    """``tiny_model`` on an attention that lets packed examples see each other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(LEAKY, _leaky_attention)
    AttentionMaskInterface.register(LEAKY, lambda *args, **kw: None)
    return tiny_model(family, attn=LEAKY, **kwargs)


def word_tokenizer(chat_template: bool = True):
    return build_word_tokenizer(WORDS) if chat_template else build_word_tokenizer(WORDS, chat_template=None)


def random_examples(lengths, vocab_size=64, seed=0, answer_tail=None):
    """Examples of the given lengths; labels on every token, or on the last `answer_tail` tokens only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab_size, (n,), generator=g).tolist()
        tail = n if answer_tail is None else min(answer_tail, n)
        labels = [-100] * (n - tail) + ids[n - tail :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def raft_qa(n_questions: int = 12, n_corpus: int = 40, seed: int = 0):
    """A corpus of word passages of varied lengths and QA records whose oracle is one of them (RaftBuilder input)."""
    g = torch.Generator().manual_seed(seed)
    fill = WORDS[:32]

    def words(n):
        return " ".join(fill[i] for i in torch.randint(0, len(fill), (n,), generator=g).tolist())

    corpus = [{"id": f"p{i}", "text": words(3 + i % 9)} for i in range(n_corpus)]
    qa = [
        {
            "id": f"q{j}",
            "question": f"who {words(2)} ?",
            "answer": f"{words(1 + j % 3)} {{cite}}",
            "oracle_passages": [corpus[j]],
        }
        for j in range(n_questions)
    ]
    return corpus, qa


def trainer_args(tmp_path, **kw):
    """RagTrainingArguments for exact small tests: plain SGD at a constant rate, no clipping or decay, one bin of
    32 tokens per micro-batch, logs every step, nothing saved or reported."""
    from ragkern import RagTrainingArguments

    base = dict(
        output_dir=str(tmp_path / "out"),
        max_length=32,
        per_device_train_batch_size=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=7,
    )
    return RagTrainingArguments(**{**base, **kw})


class GradCapture(TrainerCallback):
    """Keeps the gradients of the first optimizer step (comparing updates p1 - p0 loses digits to rounding)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
            }


def plain_trainer_step(tmp_path, model, examples, **kw):
    """The reference: one stock ``transformers.Trainer`` SGD step (rate 0.5, no clipping) on ``examples`` padded
    into one batch, with the model's own attention and loss. Returns the trainer and the step's gradients."""
    from transformers import Trainer, TrainingArguments

    from ragkern.collator import PaddingCollator

    plain = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=len(examples),
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
        **kw,
    )
    capture = GradCapture()
    trainer = Trainer(
        model=model,
        args=plain,
        data_collator=PaddingCollator(pad_token_id=0),
        train_dataset=examples,
        callbacks=[capture],
    )
    trainer.train()
    return trainer, capture.grads


@dataclass
class Recording(PackingCollator):
    """A PackingCollator that keeps the input_ids of every example of every batch it collates."""

    seen: list = field(default_factory=list)

    def __call__(self, examples):
        self.seen.append([tuple(e["input_ids"]) for e in examples])
        return super().__call__(examples)
