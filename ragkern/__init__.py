"""ragkern: fast, correct retrieval-augmented fine-tuning inside the Hugging Face stack.

``import ragkern`` registers the "ragkern" attention with transformers, so any model loaded with
``attn_implementation="ragkern"`` keeps packed examples apart.
"""

__version__ = "0.1.0"

from . import attention as _attention
from .collator import PackingCollator
from .trainer import RagTrainer, RagTrainingArguments

_attention.register()

__all__ = ["PackingCollator", "RagTrainer", "RagTrainingArguments", "__version__"]
