"""Test-suite configuration: the meaning of the markers declared in pyproject.toml.

- ``slow``: excluded by the default run (``addopts = -m 'not slow'``); run with ``-m slow``.
- ``cuda``: needs a CUDA device; skipped, with a reason naming what is missing, where there is none.
- ``npu``: needs torch_npu and an Ascend NPU; skipped with the reason (package missing or broken,
  no device). torch_npu is looked for only when a collected test carries the marker.
"""

from __future__ import annotations

import os

import pytest
import torch

# The compiled backend's multi-tensor graphs step 16 (small tensors) or 4 (large) parameters per call by
# default; compile time grows with that count, so the suite compiles graphs of 4 and 2 slots: the same
# code paths (chunks, padding slots, several chunks per group), a fraction of the compile time. The
# slow tests run the default counts too (tests/test_multi_tensor.py).
os.environ.setdefault("PORTOPT_COMPILE_ARITY", "4,2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip_cuda)
    npu_items = [item for item in items if item.get_closest_marker("npu") is not None]
    if npu_items:
        from portopt.backends import device_unavailable_reason

        missing = device_unavailable_reason("npu")
        if missing is not None:
            for item in npu_items:
                item.add_marker(pytest.mark.skip(reason=f"needs torch_npu and an Ascend NPU: {missing}"))
