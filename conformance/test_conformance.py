"""The conformance suite as tests: ``pytest --pyargs portopt.conformance --portopt-backend=NAME``.

One test per (case, implementation, precision, device) chosen by the plugin's options
(:mod:`portopt.conformance.plugin`); a failure's message is the diagnosis.
"""

from __future__ import annotations

import pytest

from portopt.conformance.plugin import Job, conformance_jobs, job_id
from portopt.conformance.results import ERROR, FAIL, SKIP
from portopt.conformance.runner import TrajectoryCache, run_case

_CACHE = TrajectoryCache()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_job" in metafunc.fixturenames:
        jobs = conformance_jobs(metafunc.config)
        metafunc.parametrize("conformance_job", jobs, ids=[job_id(j) for j in jobs])


def test_conformance(conformance_job: Job) -> None:
    case, impl, precision, device = conformance_job
    result = run_case(case, impl, precision, device, trajectory=_CACHE.get(case, impl, precision, device))
    if result.status == SKIP:
        pytest.skip(result.reason)
    if result.status == ERROR:
        pytest.fail(f"{result.reason}\n" + "\n".join(result.notes), pytrace=False)
    if result.status == FAIL:
        pytest.fail(result.reason, pytrace=False)
