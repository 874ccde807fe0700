"""Blind policies in a TakeCover run's dream: how long M lets each of them live.

    python scripts/dream_baselines.py --run runs/tj [--dreams 100] [--seed 10000]
                                      [--max-steps 600] [--pacer 110 57]

Always left, always right, standing still, and the blind pacer (agents/policies.py) for each
``--pacer`` leg length play the same ``--dreams`` dreams: the start z and M's noise come from
``--seed`` exactly as in ``evaluate``'s "in the dream" lines (:func:`agents.evaluate.dream_score`),
and a dream ends as the run's CMA-ES dreamt (τ, done rule and threshold), at most
``--max-steps`` steps (default ``cmaes.max_steps``).  A dream that lets a wall-hugger live far
longer than the real game does (about 170 steps) has a hole a controller will find.
Results: docs/results.md, "Run tj".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dream_lengths(run, policy_at, dreams: int, seed: int, max_steps: int | None) -> np.ndarray:
    """Lengths of ``dreams`` dreams in which ``policy_at(t)`` (a float) is every dream's action at step t."""
    import torch

    from agents.controller import ControllerSpec
    from envs.dream import DreamSettings, dream_rollouts, load_start_latents, load_world_model, sample_start_z

    m = load_world_model(run)
    settings = DreamSettings.from_config(run.cfg)
    if max_steps is not None:
        settings = dataclasses.replace(settings, max_steps=max_steps)
    spec = ControllerSpec.for_config(run.cfg, m)
    generator = torch.Generator().manual_seed(seed)
    z0 = sample_start_z(load_start_latents(run), dreams, generator)
    with torch.no_grad():
        result = dream_rollouts(m, torch.zeros(dreams, 0), spec, z0, settings, generator,
                                policy=lambda t, f: f.new_full((f.shape[0], 1), policy_at(t)))
    return result.lengths.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--dreams", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's eval.seed")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the run's cmaes.max_steps")
    parser.add_argument("--pacer", type=int, nargs="*", default=[110], help="pacer leg lengths")
    args = parser.parse_args()

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
            lengths = dream_lengths(run, policy_at, args.dreams, seed, args.max_steps)
            print(f"{name:>14}: {lengths.mean():.1f} ± {lengths.std():.1f} dream steps over {args.dreams} dreams",
                  flush=True)
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
