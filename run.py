#!/usr/bin/env python
"""World Models from the command line.

    python run.py collect    --config configs/takecover-cpu.yaml
    python run.py train-vae  --run runs/takecover-cpu
    python run.py train-rnn  --run runs/takecover-cpu      (alias: train-m)
    python run.py dream      --run runs/takecover-cpu
    python run.py iterate    --run runs/takecover-cpu      (collect with C, retrain M, dream on)
    python run.py evaluate   --run runs/takecover-cpu --episodes 100
    python run.py pipeline   --config configs/takecover-cpu.yaml   (all of the above)
    python run.py watch      --run runs/takecover-cpu
    python run.py plot       --run runs/takecover-cpu
    python run.py export     --run runs/takecover-cpu --out pretrained/takecover

Every command takes ``--config FILE``, ``--run DIR`` (default ``runs/<config name>``)
and ``--set section.key=value`` (recorded in the run's config by the commands that train; for
evaluate, watch, plot and export it holds for that command only).  Rerunning a command on the
same run continues it.
This file only parses the command line; the work lives in worldmodel/, agents/, envs/.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("collect", "train-vae", "train-rnn", "train-m", "dream", "iterate", "evaluate",
            "pipeline", "watch", "plot", "export")
# Commands that train record their --set in the run's config.yaml, so that the run resumes under
# them; the others (evaluate, watch, plot, export) apply --set to themselves only.
TRAINS = ("collect", "train-vae", "train-rnn", "train-m", "dream", "iterate", "pipeline")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); needed for a new run")
    parser.add_argument("--run", help="run folder (default runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (repeatable)")
    parser.add_argument("--workers", type=_positive, help="worker processes for real-env work")
    parser.add_argument("--backend", choices=("local", "ray"), help="where real-env work runs")
    parser.add_argument("--skip-bad", action="store_true", help="skip corrupt episode files instead of stopping")
    parser.add_argument("--episodes", type=_positive, help="evaluate / watch: number of episodes")
    parser.add_argument("--video", action="store_true", help="evaluate: record a few episodes")
    parser.add_argument("--temperature", type=float, help="watch: dream temperature tau")
    parser.add_argument("--steps", type=_positive, help="watch: steps per video")
    parser.add_argument("--jump", type=_positive, help="watch: TD-VAE dreams the side-by-side in jumps of N steps")
    parser.add_argument("--out", help="watch: output folder; export: the new agent folder")
    parser.add_argument("--play", action="store_true", help="watch: play the dream with the keyboard")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _print(summary: dict) -> None:
    for key, value in summary.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


def dispatch(args: argparse.Namespace) -> None:
    from worldmodel.runs import open_run

    resolved = open_run(args.run, args.config, args.overrides, create=False)
    with resolved.lock():  # before open_run writes the run's config (the commands that train)
        trains = args.command in TRAINS
        _run_command(open_run(args.run, args.config, args.overrides) if trains else resolved, args)


def _run_command(run, args: argparse.Namespace) -> None:
    from worldmodel.errors import UserError

    progress = not args.quiet
    print(f"run {run.dir} ({args.command})")
    if args.command in TRAINS and args.command != "collect":
        from worldmodel.torch_utils import describe_compute

        print(describe_compute(run.cfg.system.device, run.cfg.system.precision))
    if args.command == "collect":
        from agents.collect import collect

        _print(collect(run, workers=args.workers, backend=args.backend, progress=progress))
    elif args.command == "train-vae":
        from worldmodel.train_vae import train_vae

        _print(train_vae(run, skip_bad=args.skip_bad, progress=progress))
    elif args.command in ("train-rnn", "train-m"):
        from worldmodel.train_m import train_m

        _print(train_m(run, skip_bad=args.skip_bad))
    elif args.command == "dream":
        from agents.pipeline import dream, select

        _print(dream(run, workers=args.workers, backend=args.backend, progress=progress))
        _print(select(run, workers=args.workers, backend=args.backend))
    elif args.command == "iterate":
        from agents.iterate import iterate
        from agents.pipeline import select

        _print(iterate(run, workers=args.workers, backend=args.backend, skip_bad=args.skip_bad,
                       progress=progress))
        _print(select(run, workers=args.workers, backend=args.backend))
    elif args.command == "evaluate":
        from agents.evaluate import evaluate_run

        _print(evaluate_run(run, episodes=args.episodes, workers=args.workers, backend=args.backend,
                            video=args.video, progress=progress))
    elif args.command == "pipeline":
        from agents.pipeline import pipeline

        pipeline(run, workers=args.workers, backend=args.backend, skip_bad=args.skip_bad, progress=progress)
    elif args.command == "watch":
        from agents.watch import watch

        _print(watch(run, args))
    elif args.command == "export":
        from worldmodel.export import export_run

        if not args.out:
            raise UserError("export needs --out FOLDER (e.g. pretrained/takecover)")
        _print(export_run(run, args.out))
    elif args.command == "plot":
        from worldmodel.plots import plot_run

        _print(plot_run(run))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from worldmodel.errors import UserError

    try:
        dispatch(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
