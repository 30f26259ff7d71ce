"""The GPU tier (`make test-gpu`): checks only a CUDA device can make. Plain torch, no Ray.

Every module here marks its tests `gpu`, which the default run deselects; where no CUDA device
is visible they skip, so `pytest -m gpu` stays green on a CPU machine.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
