"""A CMA-ES generation's dreams: split over one-thread processes (ours) against one batch.

``agents/cmaes.py`` dreams each generation (population + 1 candidates × rollouts) either
in this process as one batch with every thread (``cmaes.workers: 1``, the baseline) or
split over one-thread worker processes, each dreaming a share of the candidates
(``cmaes.workers`` null: one per core; agents/dream_workers.py).  Both run here on the same
candidates and generation seeds, rounds alternating; the script prints the seconds per
generation of each (the pool already started: its start is printed apart), the ratio, and
whether the two gave the same fitness (bfloat16 products may round a row differently with the
rows beside it and the thread count: agents/dream_workers.py).

    python benchmarks/dream_workers.py                     # the preset's ensemble, random weights
    python benchmarks/dream_workers.py --run runs/h384z1   # a run's M's, controller search and config

With ``--run``: the run's M files (ensemble, critic), start latents, dream settings and the
candidates of its saved CMA-ES state (nothing in the run is written).  Without: the preset's
ensemble (three MDN-RNNs of z 64, LSTM 512, 5 mixtures, and a critic) with random weights, each
member's done bias ending a dream after about 200 steps, sampled (the preset's population,
rollouts, length and ensemble rule).

Results: docs/benchmarks.md, "Dream workers".
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from agents.cmaes import dream_fitness, generation_seed, load_state
from agents.controller import ControllerSpec
from agents.dream_workers import DreamPool
from envs.dream import DreamSettings, assemble_world_model, load_start_latents, load_world_model
from worldmodel import config as config_lib
from worldmodel.mdnrnn import MDNRNN
from worldmodel.runs import open_run
from worldmodel.torch_utils import available_cores

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "takecover-cpu.yaml"


def from_run(path: Path):
    run = open_run(path, None, create=False)
    m = load_world_model(run, "cpu").eval()
    spec = ControllerSpec.for_config(run.cfg, m)
    es = load_state(run.path("cmaes.pkl"))["es"]
    np.random.seed(0)  # pycma's ask draws from numpy's global generator
    candidates = np.vstack([np.asarray(es.ask()), es.mean[None]])
    return run.cfg, m, spec, load_start_latents(run), candidates


def synthetic():
    cfg = config_lib.load(PRESET)
    cfg.cmaes.done = "sample"
    torch.manual_seed(0)
    members = [MDNRNN(cfg.vae.z_dim, 1, cfg.model.hidden, cfg.model.mixtures) for _ in range(cfg.model.ensemble)]
    for member in members:
        with torch.no_grad():
            member.head.bias[-1] = -6.4  # P(done) about 1/600 a step for each
    critic = MDNRNN(cfg.vae.z_dim, 1, cfg.model.hidden, cfg.model.mixtures) if cfg.model.hazard_horizon else None
    m = assemble_world_model(cfg, members, critic).eval()
    spec = ControllerSpec.for_config(cfg, m)
    rng = np.random.default_rng(0)
    candidates = rng.normal(0, 0.1, size=(cfg.cmaes.population + 1, spec.num_params))
    starts = torch.randn(64, 2, cfg.vae.z_dim, generator=torch.Generator().manual_seed(0))
    starts[:, 1] = -2.0  # log-variances
    return cfg, m, spec, starts, candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run with M files, latents and cmaes.pkl (default: synthetic)")
    parser.add_argument("--generations", type=int, default=4, help="generations per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=available_cores())
    args = parser.parse_args()
    cfg, m, spec, starts, candidates = from_run(args.run) if args.run else synthetic()
    settings, rollouts = DreamSettings.from_config(cfg), cfg.cmaes.rollouts
    seeds = [generation_seed(0, g) for g in range(1, args.generations + 1)]
    times: dict[str, list[float]] = {"one batch": [], "split": []}
    fitness: dict[str, list[np.ndarray]] = {}
    steps = 0
    start = time.perf_counter()
    with DreamPool(args.workers, m, spec, starts, None, 0, 3600.0) as pool:
        pool.fitness(candidates[: args.workers], settings, 1, 0)  # start the workers
        print(f"pool of {args.workers} started in {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(args.rounds):
            t = time.perf_counter()
            fitness["one batch"] = [dream_fitness(m, candidates, spec, settings, starts, rollouts,
                                                  torch.Generator().manual_seed(s))[0] for s in seeds]
            times["one batch"].append((time.perf_counter() - t) / len(seeds))
            t = time.perf_counter()
            results = [pool.fitness(candidates, settings, rollouts, s) for s in seeds]
            times["split"].append((time.perf_counter() - t) / len(seeds))
            fitness["split"] = [r[0] for r in results]
            steps = sum(r[2] for r in results) // len(seeds)
    same = all(np.array_equal(a, b) for a, b in zip(fitness["one batch"], fitness["split"]))
    print(f"torch {torch.__version__}, {available_cores()} cores, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads in this process; {len(candidates)} candidates x {rollouts} dreams, "
          f"LSTM {cfg.model.hidden}, about {steps} dream steps a generation")
    for label, ts in times.items():
        print(f"{label}: {min(ts):.2f} s a generation (best of {len(ts)} rounds)")
    print(f"split / one batch: {min(times['one batch']) / min(times['split']):.2f}x faster; "
          f"same fitness: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
