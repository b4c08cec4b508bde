"""Worker processes for conformance runs: independent units of work, largest first.

A unit is one (case, precision) with every implementation and device that shares its
reference chain (:func:`portopt.conformance.runner.run_group`), so no chain is computed
twice. :func:`map_units` runs a picklable function over the units, in this process
(``workers <= 1``) or in ``workers`` spawned processes (never forked: a forked torch
can deadlock in its thread pools), handing each result to ``on_result`` as it arrives.
Units are started in decreasing order of their estimated cost (longest processing time
first), so that the last unit to finish is a small one. Each worker uses
``cpu_count // workers`` torch threads, so workers do not oversubscribe the cores.

An interrupted parent (Ctrl-C, SIGTERM from ``timeout``) stops its workers before the
exception propagates; results already handed over stay handed over.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

U = TypeVar("U")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per core this process may use (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)


def _init_worker(threads: int, initializer: Callable[..., None] | None, args: tuple[Any, ...]) -> None:
    import torch

    # The parent handles Ctrl-C (it stops the workers and writes what it has).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if initializer is not None:
        initializer(*args)


def map_units(
    fn: Callable[[U], R],
    units: Sequence[U],
    workers: int,
    on_result: Callable[[int, R], None],
    *,
    costs: Sequence[float] | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> None:
    """``on_result(i, fn(units[i]))`` for every unit, as each finishes.

    ``fn`` and ``initializer`` must be importable module-level functions, and the units and
    ``initargs`` picklable, when ``workers > 1``. ``initializer(*initargs)`` runs once per
    worker (in this process first, when ``workers <= 1``).
    """
    order = sorted(range(len(units)), key=lambda i: -(costs[i] if costs is not None else 0.0))
    workers = min(workers, len(units))
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for i in order:
            on_result(i, fn(units[i]))
        return
    threads = max(1, default_workers() // workers)
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads, initializer, initargs),
    )
    pending: dict[Future[R], int] = {}
    try:
        queue = list(order)
        # Keep each worker busy with one unit and one queued, so the order of the rest holds.
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                i = queue.pop(0)
                pending[executor.submit(fn, units[i])] = i
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(pending.pop(future), future.result())
    except BaseException:
        _stop(executor)
        raise
    executor.shutdown(wait=True)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (Python < 3.14 has no public way)."""
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
