#!/usr/bin/env bash
# The test command (README: "Tests"): set up this checkout's venv, then run the test suite.
#
#     bash .ci/test.sh                 # default suite: everything not marked slow
#     bash .ci/test.sh -m slow         # extra pytest arguments are passed through
#
# The default run excludes @pytest.mark.slow (see addopts in pyproject.toml); tests that need
# hardware which is absent (CUDA, NPU, XPU) skip with a reason naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh test
# PYTHONSAFEPATH (Python >= 3.11): `python -m` must not put the checkout on sys.path, so the tests
# import what the installed package holds (a top-level `backends` must not be importable).
PYTHONSAFEPATH=1 exec python -m pytest "$@"
