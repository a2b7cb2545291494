"""Test configuration: Triton kernels run under the interpreter on machines without a GPU.

``TRITON_INTERPRET`` must be set before any Triton kernel is defined, so it is set here, before the test
modules import resnet_fused.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
