import os

# Tests run on CPU, where Triton only runs interpreted. Set before any module defines a @triton.jit function: a
# helper jitted in compiled mode cannot be called from an interpreted kernel, whatever the import order of tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# CPU traps (ENVIRONMENT.md): denormals make small-net training ~17x slower.
torch.set_flush_denormal(True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
