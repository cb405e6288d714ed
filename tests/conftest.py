import os

import pytest
import torch

# CPU traps (ENVIRONMENT.md): denormals make small-net training ~17x slower.
torch.set_flush_denormal(True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
