"""The Ray backend of :func:`agents.workers.run_tasks` (``pip install -e '.[ray]'``).

The same task functions run as Ray tasks: on a local cluster by default, on a
real one when ``RAY_ADDRESS`` or ``system.ray_address`` names it.
"""

from __future__ import annotations

import os
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
    from agents.workers import WorkerError, _handle

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
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        if not ready:
            raise WorkerError(f"no Ray task finished within {timeout:.0f} s")
        ref = ready[0]
        task = refs.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerError(f"Ray task {task.get('name', task)} failed: {first}") from None
        if _handle(task, outcome, attempts, retries):
            refs[remote.remote(fn, task)] = task
        else:
            yield task, outcome[1]
