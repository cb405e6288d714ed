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


@pytest.fixture
def quiet_libraries():
    """Library loggers (diffusers' prompt truncation, transformers' notices) off for a test that reads stderr: their
    lines are not sid_fast's, and their handlers may hold the stream of an earlier test's capture (a "Logging
    error" with a traceback when written to)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers", "torch", "deepspeed")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture(scope="session")
def mixture_lanes(tmp_path_factory):
    """The exact-mixture distillations running in the background (tests/mixture_lanes.py)."""
    from mixture_lanes import Lanes

    lanes = Lanes(tmp_path_factory.mktemp("mixture-lanes"))
    yield lanes
    lanes.close()


@pytest.fixture(scope="session", autouse=True)
def _start_mixture_lanes_early(request):
    """Start the mixture distillations with the session when their tests are selected: about 8 min of two cores
    that the rest of the suite would otherwise wait for at the end."""
    if not any(item.path.name == "test_sid_mixture.py" for item in request.session.items):
        yield
        return
    request.getfixturevalue("mixture_lanes")
    # The two lanes keep two threads busy: the tests beside them run at one thread (and so do the processes they
    # start), so that no OpenMP thread team spins waiting for a core a lane holds (ENVIRONMENT.md: two processes at
    # the default thread count on 2 cores slowed each other down many times over).
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
