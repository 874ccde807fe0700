"""How good was ``select``'s pick?  Its candidates, each with the M it was checked with, on other seeds.

    python scripts/select_candidates.py --run runs/tc12 [--episodes 100] [--seed 10000] [--top 3]

``select`` (agents/select.py) plays the ``cmaes.select_top`` best real checks on
``cmaes.select_episodes`` fresh episodes and keeps the best.  This script plays the same
candidates on ``--episodes`` episodes from ``--seed`` (default: the evaluation seeds) and prints
each one's mean beside its check and its selection score; ``--top N`` plays the N best checks
instead of the run's ``cmaes.select_top`` (a large N: every check whose M was kept).  A diagnostic only: it changes
nothing in the run, and a controller must never be picked on the evaluation seeds.
Results: docs/results.md, run tc12 ("How good is select's pick?") and run c1z4 ("Does `select`
leave a better controller behind?").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder after `select`")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=10_000, help="first seed (default eval.seed)")
    parser.add_argument("--top", type=int, default=None, help="how many checks (default cmaes.select_top)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from agents.cmaes import STATE_FILE, check_key, load_state
    from agents.evaluate import evaluate_params
    from agents.select import candidates, earlier_m, read_cache
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        if args.episodes < 1:
            raise UserError(f"--episodes {args.episodes}: must be at least 1")
        top_n = [] if args.top is None else [f"cmaes.select_top={args.top}"]  # the config checks it
        run = open_run(args.run, None, top_n, create=False)
        if not run.path(STATE_FILE).exists():
            raise UserError(f"{run.path(STATE_FILE)}: not found (run `dream` first)")
    except UserError as exc:
        sys.exit(f"error: {exc}")
    top, m_id = candidates(run, load_state(run.path(STATE_FILE)).get("checks", []))
    selected = {key: v["mean"] for scores in read_cache(run).values() for key, v in scores.items()}
    print(f"candidate    real check   select's score   {args.episodes} episodes from seed {args.seed}")
    for check in top:
        returns = np.asarray(evaluate_params(run, check["params"].copy(), args.episodes, args.seed,
                                             workers=args.workers, **earlier_m(run, check, m_id)))
        key = check_key(check)
        select_score = f"{selected[key]:.1f}" if key in selected else "-"
        print(f"{key:>10}   {check['real_score']:10.1f}   {select_score:>14}   "
              f"{returns.mean():.1f} ± {returns.std():.1f} (standard error {returns.std() / len(returns) ** 0.5:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
