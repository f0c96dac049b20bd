"""ragkern: fast, correct retrieval-augmented fine-tuning inside the Hugging Face stack.

``import ragkern`` registers the "ragkern" attention with transformers (as soon as transformers' model code is
loaded), so any model loaded with ``attn_implementation="ragkern"`` keeps packed examples apart. The package
itself imports torch and transformers only when its classes are first used.
"""

from __future__ import annotations

import importlib

from ._register import register_when_transformers_loads

__version__ = "0.1.0"
__all__ = ["PackingCollator", "RagTrainer", "RagTrainingArguments", "__version__"]

_LAZY = {"PackingCollator": ".collator", "RagTrainer": ".trainer", "RagTrainingArguments": ".training_args"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ragkern' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


register_when_transformers_loads()
