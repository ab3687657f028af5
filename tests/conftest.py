import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helper modules (lidiff_reference, ...)

# Without CUDA, Triton kernels run in its interpreter, which must be chosen before Triton is first
# imported (tests/test_triton.py runs the Triton backend on CPU tensors that way).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores are shared by the whole suite; more intra-op threads only add contention.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def available_backends():
    from lidar_completion import sparse
    names = ["torch"]
    if sparse.minkowski_available():
        names.append("minkowski")
    return names


@pytest.fixture(params=available_backends())
def backend(request):
    """Every sparse backend available here (torch always; MinkowskiEngine when built and not hidden)."""
    return request.param
