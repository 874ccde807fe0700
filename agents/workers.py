"""Run real-environment work in parallel: a local process pool or a Ray cluster.

Both backends take a picklable function and a list of task dicts and yield
``(task, result)`` as tasks finish.  A task that raises is retried; one that
keeps failing stops the run with the worker's traceback.  A worker that dies
or hangs past ``timeout`` seconds stops the run with a clear message: never a
hang.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from worldmodel.errors import UserError
from worldmodel.torch_utils import THREAD_ENV_VARS, single_thread

Task = dict[str, Any]


class WorkerError(UserError):
    """A worker task failed for good; the message names the task and the cause."""


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextmanager
def _single_thread_env() -> Iterator[None]:
    """Child processes inherit the environment at start: give them one BLAS / torch thread."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    os.environ.update({k: "1" for k in THREAD_ENV_VARS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _call(fn: Callable[[Task], Any], task: Task) -> Any:
    """Run in the worker; ship the traceback as text so the parent can show it."""
    try:
        return ("ok", fn(task))
    except Exception:  # noqa: BLE001 - reported to the parent, which decides
        return ("error", traceback.format_exc())


def _describe(task: Task) -> str:
    return task.get("name") or ", ".join(f"{k}={v}" for k, v in task.items() if isinstance(v, (int, str)))


def run_tasks(fn: Callable[[Task], Any], tasks: list[Task], workers: int | None = None,
              backend: str = "local", timeout: float = 1800.0, retries: int = 1,
              ray_address: str | None = None) -> Iterator[tuple[Task, Any]]:
    """Yield ``(task, fn(task))`` in completion order, running tasks in parallel."""
    if not tasks:
        return
    workers = workers or default_workers()
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if backend == "local":
        yield from _run_local(fn, tasks, workers, timeout, retries)
    elif backend == "ray":
        from agents.ray_backend import run_ray

        yield from run_ray(_call, fn, tasks, workers, timeout, retries, ray_address)
    else:
        raise UserError(f"--backend {backend!r}: unknown backend (known: local, ray)")


def _handle(task: Task, outcome: tuple[str, Any], attempts: dict[int, int], retries: int) -> bool:
    """True when the task should be retried; raises when it failed for good."""
    status, value = outcome
    if status == "ok":
        return False
    attempts[id(task)] = attempts.get(id(task), 0) + 1
    print(f"worker task {_describe(task)} failed:\n{value}", file=sys.stderr)
    if attempts[id(task)] <= retries:
        print(f"retrying {_describe(task)} ({attempts[id(task)]}/{retries})", file=sys.stderr)
        return True
    last = value.strip().splitlines()[-1] if value.strip() else "unknown error"
    raise WorkerError(f"worker task {_describe(task)} failed after {retries + 1} attempts: {last}")


def _run_local(fn: Callable[[Task], Any], tasks: list[Task], workers: int, timeout: float,
               retries: int) -> Iterator[tuple[Task, Any]]:
    if workers == 1:
        # In-process: no pickling, easiest to debug, same failure handling.
        attempts: dict[int, int] = {}
        for task in tasks:
            while True:
                outcome = _call(fn, task)
                if not _handle(task, outcome, attempts, retries):
                    yield task, outcome[1]
                    break
        return

    ctx = mp.get_context("spawn")  # fork would copy the parent's torch / BLAS thread pools
    with _single_thread_env():
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=single_thread)
    attempts = {}
    pending: dict[cf.Future, Task] = {}
    queue = list(reversed(tasks))
    try:
        yield from _drive(pool, fn, queue, pending, attempts, workers, timeout, retries)
    except cf.process.BrokenProcessPool:
        names = ", ".join(_describe(t) for t in list(pending.values())[:3]) or "a task"
        raise WorkerError(f"a worker process died while running {names} (killed or out of memory)") from None
    finally:
        for future in pending:
            future.cancel()
        _terminate(pool)


def _drive(pool: cf.ProcessPoolExecutor, fn: Callable[[Task], Any], queue: list[Task],
           pending: dict[cf.Future, Task], attempts: dict[int, int], workers: int, timeout: float,
           retries: int) -> Iterator[tuple[Task, Any]]:
    """Keep the pool fed, collect results, retry failures."""
    while queue or pending:
        while queue and len(pending) < 2 * workers:
            task = queue.pop()
            with _single_thread_env():
                pending[pool.submit(_call, fn, task)] = task
        done, _ = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        if not done:
            names = ", ".join(_describe(t) for t in list(pending.values())[:3])
            raise WorkerError(f"no worker task finished within {timeout:.0f} s (running: {names})")
        for future in done:
            outcome = future.result()
            task = pending.pop(future)
            if _handle(task, outcome, attempts, retries):
                queue.append(task)
            else:
                yield task, outcome[1]


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting on a hung or busy worker."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)
