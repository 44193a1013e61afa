"""Shared fixtures. Tests import this checkout (not an installed copy) and make their own data."""

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A suite started in the background of a non-interactive shell (`bash .ci/run &`, nohup) inherits SIGINT
# ignored, and so does every trainer it spawns: the trainer then rightly leaves Ctrl-C alone (someone
# else decided), and the Ctrl-C tests would wait for a stop that never comes. Their children get the
# default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if not has_gpu():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process, mixed precision included: a test that asks for
    another precision than the in-process tests before it needs it reset, and resets it after itself."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
