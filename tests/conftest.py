"""Shared test setup: one torch thread per process (2-core machines oversubscribe otherwise)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """The real target (SmolLM2-135M-Instruct, fp32 CPU), loaded once per test session."""
    from coralline.target import TargetRunner

    return TargetRunner.load()
