"""How long TakeCover's blind pacer lives in a run's dream at each done threshold.

    python scripts/pacer_life.py --run runs/s3z4i4 [--thresholds 0.05 0.1 0.25] [--dreams 100]
                                 [--pacer 28] [--seed 5000000] [--game 185]

One pass of ``--dreams`` pacer dreams that never end (agents/calibrate.py) gives the mean dream
life under every threshold; ``--game`` (the pacer's mean life in the real game, in steps) also
prints the threshold that ``cmaes.done_calibration: 1`` would pick for this M.
Results: docs/results.md, "A dream calibrated on the blind pacer".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5])
    parser.add_argument("--dreams", type=int, default=100)
    parser.add_argument("--pacer", type=int, default=28, help="pacer leg length (steps)")
    parser.add_argument("--seed", type=int, default=5_000_000)
    parser.add_argument("--game", type=float, default=None, help="the pacer's mean real life (steps)")
    args = parser.parse_args()

    from agents.calibrate import fit_threshold, lifetimes, pacer_done_trace
    from envs.dream import DreamSettings, load_start_latents, load_world_model
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: env.name is {run.cfg.env.name}; the blind pacer is for takecover")
        if args.dreams < 1 or args.pacer < 1:
            raise UserError("--dreams and --pacer must be at least 1")
        settings = DreamSettings.from_config(run.cfg)
        trace = pacer_done_trace(load_world_model(run), settings, load_start_latents(run), args.dreams, args.seed,
                                 args.pacer)
        for threshold in args.thresholds:
            life = lifetimes(trace, threshold)
            print(f"threshold {threshold:g}: {life.mean():.1f} ± {life.std():.1f} dream steps "
                  f"({args.dreams} dreams, τ {settings.temperature:g})")
        if args.game is not None:
            threshold = fit_threshold(trace, args.game)
            print(f"as long as in the game ({args.game:g} steps): threshold {threshold:.4f}")
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
