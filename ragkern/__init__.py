"""ragkern: fast, correct retrieval-augmented fine-tuning inside the Hugging Face stack."""

__version__ = "0.1.0"
