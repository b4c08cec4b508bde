"""A spec pickled in one process and loaded in another is the same spec (equal, same hash).

String hashes are randomised per process (``PYTHONHASHSEED``): a cached hash that travelled in the
pickle would make the loaded spec unequal to the one the loading process builds, and miss every
cache keyed on it (conformance worker processes, distributed launches, a pickled optimizer).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

import portopt
from portopt.algorithms import ALGORITHMS, get_spec

_DUMP = "import pickle, sys; from portopt.algorithms import get_spec; sys.stdout.buffer.write(pickle.dumps(get_spec(sys.argv[1])))"


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_a_spec_pickled_by_another_process_equals_and_hashes_as_this_process_s(name: str) -> None:
    assert name in ALGORITHMS
    env = dict(os.environ, PYTHONHASHSEED="12345")  # this process's seed is random or another number
    dumped = subprocess.run([sys.executable, "-c", _DUMP, name], env=env, capture_output=True, check=True).stdout
    loaded = pickle.loads(dumped)
    local = get_spec(name)
    assert loaded == local
    assert hash(loaded) == hash(local)
    assert {local: 1}.get(loaded) == 1
    for (name_a, a), (name_b, b) in zip(loaded.updates, local.updates, strict=True):
        assert name_a == name_b
        assert a == b
        assert hash(a) == hash(b)
    assert hash(loaded.param_update) == hash(local.param_update)


def test_a_pickled_optimizer_steps_in_another_process_like_the_original() -> None:
    import torch

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(7))
    opt = portopt.Lion([param], lr=1e-2)
    param.grad = torch.ones(7)
    opt.step()
    code = (
        "import pickle, sys, torch; opt, p = pickle.loads(sys.stdin.buffer.read()); p.grad = torch.ones(7); "
        "opt.step(); sys.stdout.buffer.write(pickle.dumps(p.detach()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="54321")
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps((opt, param)), env=env, capture_output=True, check=True
    ).stdout
    param.grad = torch.ones(7)
    opt.step()
    torch.testing.assert_close(pickle.loads(out), param.detach(), rtol=0, atol=0)
