"""Run real-environment work in parallel: a local process pool or a Ray cluster.

Both backends take a picklable function and a list of task dicts and yield
``(task, result)`` as tasks finish.  A task that raises is retried; one that
keeps failing stops the run with the worker's traceback.  A worker that dies
or hangs past ``timeout`` seconds stops the run with a clear message: never a
hang.  Stopping the pool also stops what its workers started (ViZDoom's
engine processes), and a worker whose parent was killed exits by itself.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from worldmodel.errors import UserError
from worldmodel.torch_utils import THREAD_ENV_VARS, available_cores

Task = dict[str, Any]
STOP_GRACE_S = 10.0  # time a stopping worker gets to close its environments before SIGKILL


class WorkerError(UserError):
    """A worker task failed for good; the message names the task and the cause."""


def default_workers() -> int:
    return available_cores()


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


def _init_worker() -> None:
    """First thing in each worker: one BLAS / torch thread, a clean exit on SIGTERM or orphaning.

    torch is not imported here: collect's workers never need it, and importing it
    costs each worker ~2 s of CPU.  A later import reads the thread variables.
    """
    os.environ.update({k: "1" for k in THREAD_ENV_VARS})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def _exit_cleanly(signum: int, frame: Any) -> None:
    # ViZDoom's engine is a child process that outlives a killed worker unless its env is
    # closed: run the exit handlers (collect registers env.close there), then go.
    atexit._run_exitfuncs()
    os._exit(128 + signum)


def _watch_parent(parent: int) -> None:
    """Exit when the parent dies (kill -9, out of memory): the task queue would block forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


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


class _TaskTimeout(BaseException):
    """Not an Exception, so that ``_call`` does not catch it as a task failure to retry."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the in-process task after ``seconds`` (SIGALRM; main thread on Unix, else no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TaskTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_local(fn: Callable[[Task], Any], tasks: list[Task], workers: int, timeout: float,
               retries: int) -> Iterator[tuple[Task, Any]]:
    if workers == 1:
        # In-process: no pickling, easiest to debug, same failure handling.
        attempts: dict[int, int] = {}
        for task in tasks:
            while True:
                try:
                    with _deadline(timeout):
                        outcome = _call(fn, task)
                except _TaskTimeout:
                    raise WorkerError(f"worker task {_describe(task)} did not finish within {timeout:g} s") from None
                if not _handle(task, outcome, attempts, retries):
                    yield task, outcome[1]
                    break
        return

    pool = open_pool(workers)
    attempts = {}
    pending: dict[cf.Future, Task] = {}
    queue = list(reversed(tasks))
    finished = False
    try:
        yield from _drive(pool, fn, queue, pending, attempts, workers, timeout, retries)
        finished = True
    except cf.process.BrokenProcessPool:
        names = ", ".join(_describe(t) for t in list(pending.values())[:3]) or "a task"
        raise WorkerError(f"a worker process died while running {names} (killed or out of memory)") from None
    finally:
        for future in pending:
            future.cancel()
        close_pool(pool, graceful=finished)


def open_pool(workers: int, initializer: Callable[..., None] | None = None,
              initargs: tuple = ()) -> cf.ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, one BLAS / torch thread each, that exit with
    their parent; ``initializer(*initargs)`` runs in each after that.  Stop it with
    :func:`close_pool`."""
    ctx = mp.get_context("spawn")  # fork would copy the parent's torch / BLAS thread pools
    with _single_thread_env():
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_then,
                                      initargs=(initializer, initargs))


def submit(pool: cf.ProcessPoolExecutor, fn: Callable[..., Any], *args: Any) -> cf.Future:
    """``pool.submit(fn, *args)``; a worker it starts (the pool spawns them as tasks come) is
    born with one thread."""
    with _single_thread_env():
        return pool.submit(fn, *args)


def _init_then(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    _init_worker()
    if initializer is not None:
        initializer(*initargs)


def _drive(pool: cf.ProcessPoolExecutor, fn: Callable[[Task], Any], queue: list[Task],
           pending: dict[cf.Future, Task], attempts: dict[int, int], workers: int, timeout: float,
           retries: int) -> Iterator[tuple[Task, Any]]:
    """Keep the pool fed, collect results, retry failures."""
    while queue or pending:
        while queue and len(pending) < 2 * workers:
            task = queue.pop()
            pending[submit(pool, _call, fn, task)] = task
        done, _ = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        if not done:
            names = ", ".join(_describe(t) for t in list(pending.values())[:3])
            raise WorkerError(f"no worker task finished within {timeout:g} s (running: {names})")
        for future in done:
            outcome = future.result()
            task = pending.pop(future)
            if _handle(task, outcome, attempts, retries):
                queue.append(task)
            else:
                yield task, outcome[1]


def close_pool(pool: cf.ProcessPoolExecutor, graceful: bool) -> None:
    """Stop the workers and the processes they started, never waiting long on a hung one.

    ``graceful``: every task is done, the workers exit on their own; otherwise they
    get SIGTERM.  Either way they close their environments first; what is still
    alive after ``STOP_GRACE_S`` is killed, engines included.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    started = _descendants({p.pid for p in processes})
    pool.shutdown(wait=False, cancel_futures=True)
    if not graceful:
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in processes:
        # join waits until the worker's children have gone too: they inherit its sentinel pipe.
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for pid, start in started.items():
        if _start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> str | None:
    """A process's start time (to tell it from a later one with the same pid); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(roots: set[int]) -> dict[int, str]:
    """{pid: start time} of every process below ``roots`` (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = [c for r in roots for c in children.get(r, [])]
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None:
            found[pid] = start
            todo.extend(children.get(pid, []))
    return found
