"""A CMA-ES generation's dreams split over one-thread processes.

On a 2-core CPU two one-thread processes, each on half the candidates, dreamt a generation of
two TakeCover runs' M's 1.5 and 1.9 times as fast as one process with two threads on the whole
batch (a few hundred rows that shrink as dreams end): the step's matrix products are small, and
the threads' barriers cost much of what the second core gives (docs/benchmarks.md, "Dream
workers"; ``python benchmarks/dream_workers.py``; a random ensemble gained only 1.06×).

Each worker dreams a contiguous share of the candidates with every one of the generation's
rollouts.  The noise of a dream depends only on its rollout's stream and the generation's
seed (:func:`envs.dream.dream_rollouts`), so every worker draws the same noise from the same
seed, and a candidate's dreams are the dreams it would have had in one batch, but for the
rounding of the matrix products: a bfloat16 product's row can change in its last bits with the
rows beside it and with the thread count (the preset's LSTM-512 M's on an AMX Xeon), as it does
between a one-thread and a two-thread run.  A generation's fitness is what
:func:`agents.cmaes.dream_fitness` gives each share in one thread (tests/test_cmaes.py), so a
search with the same ``cmaes.workers`` resumes and reruns exactly.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import numpy as np
import torch

from agents.controller import ControllerSpec
from agents.workers import WorkerError, close_pool, open_pool, submit
from envs.dream import DreamSettings, MidwayStarts
from worldmodel.m import WorldModel
from worldmodel.torch_utils import available_cores

#: With ``cmaes.workers`` null, a generation splits only where each process gets at least this
#: many dreams: below it, the processes' start (a few seconds each) costs more than they save.
MIN_DREAMS_PER_WORKER = 64

_WORKER: dict[str, Any] = {}  # in a worker: what every generation's dreams need


def dream_workers(requested: int | None, dreams: int, device: torch.device) -> int:
    """How many processes dream a generation of ``dreams`` (candidates × rollouts): ``cmaes.workers``
    where set; null -> one per core where each gets :data:`MIN_DREAMS_PER_WORKER`; 1 on a GPU."""
    if device.type != "cpu":
        return 1
    if requested is not None:
        return requested
    return max(1, min(available_cores(), dreams // MIN_DREAMS_PER_WORKER))


class DreamPool:
    """``workers`` processes that each hold M and the start latents, and dream shares of a generation.

    Use as a context manager; :meth:`fitness` is :func:`agents.cmaes.dream_fitness` for a
    generation seed instead of a generator.
    """

    def __init__(self, workers: int, m: WorldModel, spec: ControllerSpec, starts: torch.Tensor,
                 midway: MidwayStarts | None, n_midway: int, timeout: float):
        self.workers, self.timeout = workers, timeout
        self.pool = open_pool(workers, _init, (m, spec, starts, midway, n_midway))

    def fitness(self, candidates: np.ndarray, settings: DreamSettings, rollouts: int,
                seed: int) -> tuple[np.ndarray, float, int]:
        """candidates (C, P) -> (fitness (C,), mean dream length, total dream steps)."""
        shares = [s for s in np.array_split(candidates, self.workers) if len(s)]
        futures = [submit(self.pool, _dream_share, share, settings, rollouts, seed) for share in shares]
        try:
            done, running = cf.wait(futures, timeout=self.timeout)
            if running:
                raise WorkerError(f"a dream worker did not finish its share of a generation within "
                                  f"{self.timeout:g} s (system.task_timeout)")
            results = [f.result() for f in futures]
        except cf.process.BrokenProcessPool:
            raise WorkerError("a dream worker process died (killed or out of memory)") from None
        steps = sum(r[1] for r in results)
        return np.concatenate([r[0] for r in results]), steps / (len(candidates) * rollouts), steps

    def close(self, graceful: bool = True) -> None:
        close_pool(self.pool, graceful)

    def __enter__(self) -> DreamPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)


def _init(m: WorldModel, spec: ControllerSpec, starts: torch.Tensor, midway: MidwayStarts | None,
          n_midway: int) -> None:
    _WORKER.update(m=m.eval(), spec=spec, starts=starts, midway=midway, n_midway=n_midway)


def _dream_share(candidates: np.ndarray, settings: DreamSettings, rollouts: int,
                 seed: int) -> tuple[np.ndarray, int]:
    """In a worker: the share's fitness and its total dream steps."""
    from agents.cmaes import dream_fitness  # agents.cmaes imports this module

    w = _WORKER
    generator = torch.Generator(device="cpu").manual_seed(seed)
    fitness, _, steps = dream_fitness(w["m"], candidates, w["spec"], settings, w["starts"], rollouts,
                                      generator, w["midway"], w["n_midway"])
    return fitness, steps
