"""The extension ``resnet_fused._C`` for the test modules that exercise it."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch


def import_extension() -> ModuleType:
    """``resnet_fused._C``. When it is not built: on a machine with a GPU an ImportError (a failed build fails the
    test step instead of skipping it), elsewhere a skip of the calling test module (call this at import time)."""
    try:
        return importlib.import_module("resnet_fused._C")
    except ImportError as err:
        if torch.cuda.is_available():
            raise ImportError(f"resnet_fused._C is not built on a machine with a GPU: {err}") from err
        pytest.skip(f"resnet_fused._C is not built (pip install --no-build-isolation -e .): {err}",
                    allow_module_level=True)
