"""When do TakeCover agents die?  Deaths per 1000 steps by time in the episode, real and dreamt.

    python scripts/takecover_hazard.py --run runs/tr [--dreams 200] [--seed 10000]
                                       [--bins 0 64 128 256 512 1024 2100] [--teacher-forced 300]

Real rows come from the run's eval.json: the agent's, the random policy's and the blind pacer's
episodes as ``evaluate`` played them.  Dream rows play the run's controller and the blind pacer
(``eval.pacer_steps``) in ``--dreams`` of the run's dreams, as ``evaluate``'s dream scores do
(:func:`agents.evaluate.dream_episodes`).  The cell for the bin [a, b) is 1000 × deaths in it /
steps lived in it, with the deaths and the episodes alive at step a in brackets; an episode cut
off at the step limit counts its steps, not a death.  A dream whose death rate stays flat while
the game's climbs lets a controller live longer than it would.  Results: docs/results.md, "Why
the dream is lenient late".

With ``--teacher-forced K``, two more rows: the K longest episodes of the run's latents, their
real deaths per 1000 steps and M's mean P(done) per 1000 steps while it filters them (z = V's
mean, the state carried from the first step, as the real agent's M runs).  Where the first row
climbs and the second follows, M reads the late game from the frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BINS = (0, 64, 128, 256, 512, 1024, 2100)


def hazard(lengths: np.ndarray, died: np.ndarray, bins: tuple[int, ...]) -> list[tuple[float, int, int]]:
    """Per bin [a, b): (deaths per 1000 steps lived in it, deaths, episodes alive at step a).

    An episode of length L lived steps 0 .. L-1 and, if it died, died at its last step.
    The rate is nan for a bin no episode reached."""
    lengths, died = np.asarray(lengths), np.asarray(died, bool)
    rows = []
    for a, b in zip(bins[:-1], bins[1:]):
        lived = (np.clip(lengths, a, b) - a).sum()
        deaths = int(((lengths > a) & (lengths <= b) & died).sum())
        rows.append((1000.0 * deaths / lived if lived else float("nan"), deaths, int((lengths > a).sum())))
    return rows


def teacher_forced(run, k: int, bins: tuple[int, ...]) -> dict[str, list]:
    """Real deaths and M's mean P(done), per 1000 steps and bin, on the k longest episodes."""
    import torch

    from worldmodel.latents import load_latents
    from worldmodel.train_m import load_m

    m = load_m(run.m_path, run.cfg, z_dim=run.cfg.vae.z_dim).eval()
    data = load_latents(run.latents_dir, run.cfg.vae.z_dim)
    longest = np.sort(np.argsort(-data.lengths, kind="stable")[:k])
    starts, lengths = data.starts[longest], data.lengths[longest]
    state, p_done = m.initial_state(len(longest)), []
    with torch.no_grad():
        for t in range(int(lengths.max())):
            rows = np.where(lengths > t, starts + t, starts)  # finished episodes repeat a row, unused
            state, _, _, p = m.imagine_step(state, torch.from_numpy(data.mu[rows]),
                                            torch.from_numpy(data.action[rows]), 0.0)
            p_done.append(p.numpy())
    p_done = np.stack(p_done, 1)  # (k, T)
    died = data.terminated[starts + lengths - 1]
    real = hazard(lengths, died, bins)
    predicted = []
    for (_, _, alive), a, b in zip(real, bins[:-1], bins[1:]):
        lived = np.arange(p_done.shape[1])[None, a:b] < lengths[:, None]
        predicted.append((1000.0 * p_done[:, a:b][lived].mean() if lived.any() else float("nan"),
                          None, alive))
    label = f"{len(longest)} longest"
    return {f"data: {label}": real, "M's P(done) on them": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--dreams", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's eval.seed")
    parser.add_argument("--bins", type=int, nargs="+", default=list(BINS), help="bin edges in steps")
    parser.add_argument("--teacher-forced", type=int, default=0, metavar="K",
                        help="also M's P(done) on the K longest episodes of the data")
    args = parser.parse_args()

    from agents.evaluate import dream_episodes
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: env.name is {run.cfg.env.name}; this script is for takecover")
        bins = tuple(args.bins)
        if args.dreams < 1 or len(bins) < 2 or any(b <= a for a, b in zip(bins[:-1], bins[1:])) or bins[0] < 0:
            raise UserError(f"--dreams {args.dreams} --bins {' '.join(map(str, bins))}: need at least one "
                            "dream and increasing bin edges from 0 or more")
        limit = run.cfg.env.max_steps
        rows: dict[str, list] = {}
        report_path = run.path("eval.json")
        if report_path.exists():
            report = json.loads(report_path.read_text())
            for key, name in (("agent", "real agent"), ("random", "real random policy"), ("pacing", "real pacer")):
                if key in report:
                    steps = np.array([e["steps"] for e in report[key]["episodes_detail"]])
                    rows[name] = hazard(steps, steps < report.get("max_steps", limit), bins)
        seed = run.cfg.eval.seed if args.seed is None else args.seed
        policies = (["agent"] if run.controller_path.exists() else []) + ["pacing"]
        for policy in policies:
            result, _ = dream_episodes(run, args.dreams, seed, policy)
            name = "dream agent" if policy == "agent" else "dream pacer"
            rows[name] = hazard(result.lengths.numpy(), result.terminated.numpy(), bins)
        if args.teacher_forced > 0:
            rows.update(teacher_forced(run, args.teacher_forced, bins))
    except UserError as exc:
        sys.exit(f"error: {exc}")
    header = "".join(f"{f'{a}-{b}':>17}" for a, b in zip(bins[:-1], bins[1:]))
    print(f"deaths per 1000 steps {header}")
    for name, cells in rows.items():
        print(f"{name:<22}" + "".join(f"{rate:8.2f} ({'-' if d is None else d:>3}/{n:3d})" for rate, d, n in cells))


if __name__ == "__main__":
    main()
