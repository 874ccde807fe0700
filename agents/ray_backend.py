"""The Ray backend of :func:`agents.workers.run_tasks` (``pip install -e '.[ray]'``).

The same task functions run as Ray tasks: on a local cluster by default, on a
real one when ``RAY_ADDRESS`` or ``system.ray_address`` names it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from worldmodel.errors import UserError


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray: Ray is not installed (pip install -e '.[ray]')") from None
    return ray


def run_ray(call: Callable, fn: Callable, tasks: list[dict], workers: int, timeout: float,
            retries: int, address: str | None) -> Iterator[tuple[dict, Any]]:
    from agents.workers import WorkerError, _describe, _handle

    ray = _import_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        env = {"env_vars": {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, runtime_env=env, include_dashboard=False, log_to_driver=False)
    # A task whose worker dies is resubmitted by Ray itself (max_retries); a task that
    # raises comes back as ("error", traceback) and is retried by _handle.
    remote = ray.remote(num_cpus=1, max_retries=retries)(call)
    attempts: dict[int, int] = {}
    refs = {remote.remote(fn, task): task for task in tasks}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
            if not ready:
                names = ", ".join(_describe(t) for t in list(refs.values())[:3])
                raise WorkerError(f"no Ray task finished within {timeout:g} s (running: {names})")
            ref = ready[0]
            task = refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise WorkerError(f"Ray task {_describe(task)} failed: {_cause(exc)}") from None
            if _handle(task, outcome, attempts, retries):
                refs[remote.remote(fn, task)] = task
            else:
                yield task, outcome[1]
    finally:
        # On failure, timeout or an abandoned loop, stop what is still queued or running:
        # a hung task would otherwise hold its CPU on the cluster after the run has stopped.
        for ref in refs:
            with contextlib.suppress(Exception):  # never hide the error that stopped the loop
                ray.cancel(ref, force=True)


def _cause(exc: Exception) -> str:
    """The line of a Ray error that says what went wrong (its last), without terminal colours.

    The first line only names the task (``ray::_call() (pid=..., ip=...)``).
    """
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
