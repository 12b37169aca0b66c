"""Test-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run the test once per accumulate backend (Triton through the interpreter on CPU)."""
    from tests._helpers import use_backend

    with use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def minilm():  # type: ignore[no-untyped-def]
    """MiniLM (BERT, 22.7M parameters, dropout off) and its tokenizer; skips naming the package when absent."""
    from tests._real_models import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    """SmolLM2-135M (fp32) and 4 batches of 2 x 128 tokens; skips naming the packages when absent."""
    from tests._real_models import load_smollm2

    return load_smollm2()
