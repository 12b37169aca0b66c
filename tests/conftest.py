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
