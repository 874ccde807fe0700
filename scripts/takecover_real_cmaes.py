"""A bound on what the dream can teach: CMA-ES on the run's controller in *real* Doom.

    python scripts/takecover_real_cmaes.py --run runs/tb --out runs/tb_real [--generations 30]
        [--population 16] [--episodes 2] [--sigma 0.05] [--start controller|zero]
        [--check-every 10] [--check-episodes 32] [--dream-rollouts 16] [--workers 2] [--seed 0]
    python scripts/takecover_real_cmaes.py --run runs/tr --out runs/tr_corr --population 16 \
        --sigma 0.1 --dream-rollouts 64 --rescore runs/te [runs/tm ...]

The run's V and M stay fixed; only C (the same linear map on the same features) is evolved,
and every candidate is scored by real episodes instead of dreams.  Each generation plays
all candidates and the distribution's centre on the same ``--episodes`` seeds (3,000,000 +
...; common seeds make the ranking less noisy), and every ``--check-every`` generations the
centre plays ``--check-episodes`` episodes on the seeds of the dream's real checks
(1,000,000 + seed ...), so the scores compare with the run's own ``metrics/dream.jsonl``.

If such a controller survives much longer than the dream-trained one, V and M's features
allow dodging and the dream is what falls short; if it does not, the features do.  With
``--dream-rollouts K`` every candidate is also scored in K of the run's dreams (as ``dream``
scores it), and each generation logs the rank correlation of dream and real fitness: how well
the dream could steer a search at this point.  ``--rescore RUN ...`` plays nothing: it draws
generation 1's candidates again (the same ``--run``, ``--population``, ``--sigma`` and ``--seed``
give the same ones) and scores them in each RUN's dream (another M, or an ensemble, on the same
V), printing each dream's rank correlation with the real fitness logged in ``--out``.  This is
a diagnostic, not a way to train the agent: issue 6 asks for a controller trained only in the
dream.  It resumes from ``--out``/state.pkl; ``--out``/real_cmaes.jsonl logs every
generation and ``--out``/controller.pt holds the centre with the best check.
Results: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_SEED_BASE = 3_000_000
CHECK_SEED_BASE = 1_000_000  # agents.cmaes.EVAL_SEED_BASE


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: the correlation of the ranks (ties share their mean rank); nan if one is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, float)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def play(run, params: np.ndarray, seeds: list[int], workers: int) -> np.ndarray:
    """Real returns of rows ``params`` (N, P) on ``seeds`` (N,), split over ``workers`` processes."""
    from agents.evaluate import play_many

    return np.array([r["return"] for r in play_many(run, "agent", seeds, params, workers, "local")])


def new_es(start: np.ndarray, args: argparse.Namespace):
    import cma

    opts = {"popsize": args.population, "seed": args.seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
    return cma.CMAEvolutionStrategy(start.astype(np.float64), args.sigma, opts)


def ask(es) -> tuple[list, np.ndarray]:
    """A generation's solutions, and the controllers it plays: the solutions and the centre last (N + 1, P)."""
    solutions = es.ask()
    return solutions, np.vstack([np.asarray(solutions), es.mean[None, :]]).astype(np.float32)


def dream_generator(seed: int, generation: int):
    """The dreams' noise for one generation: the same in a search and in its ``--rescore``."""
    import torch

    return torch.Generator().manual_seed(seed * 100_003 + generation)


def rescore(args: argparse.Namespace, run, spec, start: np.ndarray, log_path: Path) -> None:
    """Generation 1's candidates, drawn again, in each ``--rescore`` run's dream; rank correlation with the real."""
    from agents.cmaes import dream_fitness
    from envs.dream import DreamSettings, load_start_latents, load_world_model
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    if args.dream_rollouts < 1:
        raise UserError("--rescore needs --dream-rollouts K (dreams per candidate), as the logged run had")
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if not records or "real" not in records[0]:
        raise UserError(f"{log_path}: no generation 1 with real fitness (run it with --dream-rollouts first)")
    _, candidates = ask(new_es(start, args))
    real = np.array(records[0]["real"])
    if len(real) != len(candidates):
        raise UserError(f"{log_path}: generation 1 has {len(real)} controllers, --population "
                        f"{args.population} gives {len(candidates)}")
    print(f"real fitness of the {len(real)} controllers: mean {real.mean():.1f}, "
          f"{real.min():.1f}-{real.max():.1f}", flush=True)
    for path in args.rescore:
        other = open_run(path, None, create=False)
        m = load_world_model(other).eval()
        if m.feature_dim(other.cfg.controller.features) != spec.feature_dim:
            raise UserError(f"{path}: its M gives C {m.feature_dim(other.cfg.controller.features)} inputs, "
                            f"{args.run}'s controller takes {spec.feature_dim}")
        dream, _, _ = dream_fitness(m, candidates, spec, DreamSettings.from_config(other.cfg),
                                    load_start_latents(other), args.dream_rollouts, dream_generator(args.seed, 1))
        pearson = float(np.corrcoef(dream, real)[0, 1])
        print(f"{path}: dream mean {dream.mean():.1f} ({dream.min():.1f}-{dream.max():.1f}), rank correlation "
              f"{rank_correlation(dream, real):.3f}, Pearson {pearson:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a TakeCover run folder with vae.pt, m.pt, controller.pt")
    parser.add_argument("--out", required=True, type=Path, help="folder for state.pkl, the log and controller.pt")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=2, help="real episodes per candidate and generation")
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--start", choices=("controller", "zero"), default="controller",
                        help="centre the search on the run's controller.pt, or on zeros")
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--check-episodes", type=int, default=32)
    parser.add_argument("--dream-rollouts", type=int, default=0, metavar="K",
                        help="also score every candidate in K dreams and log the dream/real rank correlation")
    parser.add_argument("--rescore", nargs="+", type=Path, default=[], metavar="RUN",
                        help="score --out's generation 1 again in these runs' dreams; play nothing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tqdm import tqdm

    from agents.cmaes import dream_fitness
    from agents.controller import ControllerSpec, load_controller, save_controller
    from envs.dream import DreamSettings, load_start_latents, load_world_model
    from worldmodel.errors import UserError
    from worldmodel.io import atomic_path
    from worldmodel.runs import open_run
    from worldmodel.train_m import load_m

    try:
        for name in ("generations", "population", "episodes", "check_every", "check_episodes", "workers"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
        if args.dream_rollouts < 0:
            raise UserError(f"--dream-rollouts {args.dream_rollouts}: must be 0 or more")
        if args.sigma <= 0:
            raise UserError(f"--sigma {args.sigma}: must be above 0")
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: a {run.cfg.env.name} run; this script is for TakeCover")
        m = load_m(run.dir / "m.pt", run.cfg, z_dim=run.cfg.vae.z_dim).eval()
        scored = args.dream_rollouts and not args.rescore  # --rescore dreams in the other runs only
        dream_m = load_world_model(run).eval() if scored else None  # the dream's: m.pt or an ensemble
        starts = load_start_latents(run) if scored else None
        spec = ControllerSpec.for_config(run.cfg, m)
        if args.start == "controller":
            start, _ = load_controller(run.controller_path, spec=spec)
        else:
            start = np.zeros(spec.num_params, np.float32)
    except UserError as exc:
        sys.exit(f"error: {exc}")

    state_path, log_path = args.out / "state.pkl", args.out / "real_cmaes.jsonl"
    if args.rescore:
        try:
            rescore(args, run, spec, start, log_path)
        except UserError as exc:
            sys.exit(f"error: {exc}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if state_path.exists():  # this script's own file, written below
        state = pickle.loads(state_path.read_bytes())
        es = pickle.loads(state["es"])
    else:
        es = new_es(start, args)
        state = {"generation": 0, "best_check": None}
        log_path.write_text("")
    bar = tqdm(total=args.generations, initial=state["generation"], desc="real CMA-ES", unit="gen")
    while state["generation"] < args.generations:
        generation = state["generation"] + 1
        t0 = time.perf_counter()
        solutions, candidates = ask(es)
        episode_seeds = [TRAIN_SEED_BASE + args.seed + (generation - 1) * args.episodes + k
                         for k in range(args.episodes)]
        rows = np.repeat(np.arange(len(candidates)), args.episodes)
        returns = play(run, candidates[rows], episode_seeds * len(candidates), args.workers)
        fitness = returns.reshape(len(candidates), args.episodes).mean(1)
        es.tell(solutions, (-fitness[:-1]).tolist())
        record = {"generation": generation, "pop_mean": float(fitness[:-1].mean()),
                  "pop_best": float(fitness[:-1].max()), "centre": float(fitness[-1]), "sigma": float(es.sigma)}
        if args.dream_rollouts:
            dream, _, _ = dream_fitness(dream_m, candidates, spec, DreamSettings.from_config(run.cfg), starts,
                                        args.dream_rollouts, dream_generator(args.seed, generation))
            record.update(dream=dream.tolist(), real=fitness.tolist(),
                          rank_correlation=rank_correlation(dream, fitness))
        if generation % args.check_every == 0 or generation == args.generations:
            centre = es.mean.astype(np.float32)
            check_seeds = [CHECK_SEED_BASE + args.seed + k for k in range(args.check_episodes)]
            scores = play(run, np.repeat(centre[None], len(check_seeds), 0), check_seeds, args.workers)
            record.update(check_mean=float(scores.mean()), check_std=float(scores.std()))
            if state["best_check"] is None or scores.mean() > state["best_check"]:
                state["best_check"] = float(scores.mean())
                save_controller(args.out / "controller.pt", centre,
                                {**spec.to_dict(), "source": "real CMA-ES", "generation": generation,
                                 "real_score": float(scores.mean())})
        record["seconds"] = time.perf_counter() - t0
        state["generation"] = generation
        with atomic_path(state_path) as tmp:
            tmp.write_bytes(pickle.dumps({**state, "es": es.pickle_dumps()}))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(pop=f"{record['pop_mean']:.0f}", centre=f"{record['centre']:.0f}",
                        check=f"{record.get('check_mean', float('nan')):.0f}")
    bar.close()


if __name__ == "__main__":
    main()
