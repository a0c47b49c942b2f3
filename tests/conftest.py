"""Test-wide settings: one torch thread per pytest-xdist worker, so workers do not oversubscribe the cores."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
