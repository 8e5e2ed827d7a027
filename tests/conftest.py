"""Shared test fixtures: tiny timm models and images built on the spot (no downloads)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.support.models import tiny_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# Tests deliver real SIGINTs, in process and to the vitscope processes they start. A shell that runs the
# suite in the background hands it SIGINT ignored, which those processes would inherit: restore Python's
# own handler (a caught signal is reset to its default in a child process).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def vit() -> torch.nn.Module:
    return tiny_vit()
