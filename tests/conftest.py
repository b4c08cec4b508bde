"""Test-suite configuration: the meaning of the markers declared in pyproject.toml.

- ``slow``: excluded by the default run (``addopts = -m 'not slow'``); run with ``-m slow``.
- ``cuda``: needs a CUDA device; skipped, with a reason naming what is missing, where there is none.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
