"""Blind policies in a TakeCover run's dream: how long M lets each of them live.

    python scripts/dream_baselines.py --run runs/tj [--dreams 100] [--seed 10000]
                                      [--max-steps 600] [--pacer 110 57]

Always left, always right, standing still, and the blind pacer (agents/policies.py) for each
``--pacer`` leg length play the same ``--dreams`` dreams: the start z and M's noise come from
``--seed`` exactly as in ``evaluate``'s "in the dream" lines (both are
:func:`agents.evaluate.dream_score`),
and a dream ends as the run's CMA-ES dreamt (τ, done rule and threshold), at most
``--max-steps`` steps (default ``cmaes.max_steps``).  A dream that lets a wall-hugger live far
longer than the real game does (about 170 steps) has a hole a controller will find.
Results: docs/results.md, "Run tj".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--dreams", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's eval.seed")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the run's cmaes.max_steps")
    parser.add_argument("--pacer", type=int, nargs="*", default=[110], help="pacer leg lengths")
    args = parser.parse_args()

    from agents.evaluate import dream_score
    from agents.policies import PacingPolicy
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: env.name is {run.cfg.env.name}; blind baselines are for takecover")
        if args.dreams < 1 or any(k < 1 for k in args.pacer):
            raise UserError("--dreams and --pacer must be at least 1")
        seed = run.cfg.eval.seed if args.seed is None else args.seed
        policies = {"always left": lambda t: -1.0, "always right": lambda t: 1.0, "stand still": lambda t: 0.0}
        for k in args.pacer:
            policies[f"pacer {k}"] = PacingPolicy(k).action_at
        for name, policy_at in policies.items():
            score = dream_score(run, args.dreams, seed, policy_at, args.max_steps)
            print(f"{name:>14}: {score['mean']:.1f} ± {score['std']:.1f} dream steps over {args.dreams} dreams",
                  flush=True)
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
