"""Shared fixtures: a fixed seed per test and the device parametrization.

Tests that take `device` run on "cpu" always and on "cuda" when a GPU is present
(skipped cleanly otherwise), so the same suite checks the CUDA kernels on a GPU
machine.
"""

import pytest
import torch

import ffn  # noqa: F401  (registers torch.ops.ffn.*)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
