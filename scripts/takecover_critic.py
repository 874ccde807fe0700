"""A run's agent with a fresh hazard critic of another horizon: the shield's critic, screened.

    python scripts/takecover_critic.py --run runs/s4z4 --out runs/s4z4_h6 --horizon 6 [--epochs 10]
    python run.py evaluate --run runs/s4z4_h6 --set eval.seed=3000000 --set eval.pacer_steps=0

``--out`` gets hard links to the run's V, its ensemble's M files and its controller (copies where
a hard link cannot be made), a link to its latents, and the run's config with
``model.hazard_horizon`` = ``--horizon`` (and ``model.epochs`` = ``--epochs`` when given).  Then
the critic (the M file after the ensemble's) is trained afresh there on all the run's latents, as
``train-rnn`` trains it (``worldmodel.train_m.train_member``: seed ``model.seed`` + ensemble, the
run's split, precision and epochs),
and nothing else changes: ``evaluate`` on ``--out`` plays the run's agent with the new critic as
its shield.  Each epoch checkpoints; running the command again resumes.  Results:
docs/results.md, "The shield's critic looking further ahead".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems); an existing ``dst`` is kept."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder with V, M's, controller and latents")
    parser.add_argument("--out", required=True, help="the new folder (made, or resumed)")
    parser.add_argument("--horizon", type=int, required=True, help="the critic learns death within this many steps")
    parser.add_argument("--epochs", type=int, default=None, help="critic epochs (default: the run's model.epochs)")
    args = parser.parse_args()

    from worldmodel.errors import UserError
    from worldmodel.runs import open_run
    from worldmodel.train_m import format_done, train_member

    try:
        if not (Path(args.run) / "config.yaml").is_file():
            raise UserError(f"--run {args.run}: not a run folder (no config.yaml)")
        src = open_run(args.run, None, create=False)
        ensemble = src.cfg.model.ensemble
        if args.horizon < 1:
            raise UserError(f"--horizon {args.horizon}: must be at least 1")
        needed = [src.vae_path, src.controller_path] + [src.member_path(k) for k in range(ensemble)]
        missing = [str(p) for p in needed + [src.latents_dir] if not p.exists()]
        if missing:
            raise UserError(f"{args.run}: missing {', '.join(missing)}")
        out_dir = Path(args.out)
        if out_dir.resolve() == src.dir.resolve():
            raise UserError(f"--out {args.out}: must not be the run itself (its critic would be replaced)")
        resumed = (out_dir / "config.yaml").exists()
        if resumed:
            stored = open_run(out_dir, None, create=False).cfg.model.hazard_horizon
            if stored != args.horizon:
                raise UserError(f"{out_dir}/config.yaml: model.hazard_horizon is {stored}, not --horizon "
                                f"{args.horizon}: use another --out")
        overrides = [f"model.hazard_horizon={args.horizon}"]
        if args.epochs is not None:
            overrides.append(f"model.epochs={args.epochs}")
        out = open_run(out_dir, None if resumed else src.dir / "config.yaml", overrides)
        if out.cfg.model.ensemble != ensemble:
            raise UserError(f"{out_dir}/config.yaml: model.ensemble {out.cfg.model.ensemble}, "
                            f"the run's is {ensemble}: use another --out")
        for path in needed:
            link(path, out.dir / path.name)
        if not out.latents_dir.exists():
            out.latents_dir.symlink_to(src.latents_dir.resolve(), target_is_directory=True)
        summary = train_member(out, ensemble)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    print(format_done(summary))
    print(f"critic (death within {args.horizon} steps) in {out.member_path(ensemble)}; "
          f"play it with: python run.py evaluate --run {out.dir}")


if __name__ == "__main__":
    main()
