"""A finished run cut back to its first dream: what `iterate` added, with nothing trained anew.

    python scripts/first_dream_screen.py --run runs/z3a0 --out runs/ni0 [--critics first|all] [--no-select]
    python scripts/first_dream_screen.py --run runs/z3a0 --out runs/ci0 --critic-iterations 3

Builds ``--out`` from a run that has iterated: hard links to the episodes and latents its first
dream had (``collect.episodes``) and to its ``m_history/`` files, copies of V and its config with
``iterate.iterations: 0``; its first M (the
one the first dream's checks were played with: every member and the critic) becomes the run's M,
and ``cmaes.pkl`` keeps only those checks.  ``--critics first`` keeps only that M in
``m_history/``, so the shield has its one critic: the agent the same seeds make with
``iterate.iterations: 0``.  ``--critics all`` keeps every M of the run, so the shield averages
the first critic with the iterations' (``controller.shield_critics``), as the run's own ``select``
played them, and copies the run's ``select.json`` (its scores of these controllers hold).
``--critic-iterations K`` (with ``--critics first``) instead sets ``iterate.iterations: K`` and
``iterate.search: false`` and runs those critic-only iterations, each collecting with the
controller that collected the run's first iteration (the first dream's last centre): what the
same seeds would make with them, but for one thing: the run kept no training state of its first
critic, so the critic goes on from its weights with a fresh Adam (a run of its own carries
Adam's moments over).
Then ``select`` picks among the first dream's checks in ``--out``; score the pick with
``python run.py evaluate --run OUT``.
Results: docs/results.md, "The iterations' worth is in their critics".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(src: Path, out: Path, critics: str, critic_iterations: int = 0) -> list[dict]:
    """Write the cut-back run folder; returns the checks it keeps."""
    import torch

    from agents.cmaes import STATE_FILE, load_state, save_state
    from agents.controller import load_controller, save_controller
    from agents.iterate import COLLECTORS_DIR
    from agents.select import SELECT_FILE
    from worldmodel.episodes import episode_index
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run
    from worldmodel.train_m import load_m, save_training_state

    run = open_run(src, None, create=False)
    ids = run.m_snapshot_ids()
    if not ids:
        raise UserError(f"{run.m_history_index}: not found or empty; the run kept no M's to go back to")
    if out.exists():
        raise UserError(f"{out}: already exists (choose a new --out)")
    first = ids[0]
    state = load_state(run.path(STATE_FILE))
    state["checks"] = [ch for ch in state.get("checks", []) if ch.get("m") == first and "key" not in ch]
    if not state["checks"]:
        raise UserError(f"{run.path(STATE_FILE)}: no real check was played with the first M ({first})")
    if critic_iterations:
        # Every iteration collects with the first dream's agent: the controller that collected the
        # run's first iteration (cmaes.pkl's search state is the run's last one).
        first_collector = src / COLLECTORS_DIR / "iteration_1.pt"
        if not first_collector.exists():
            raise UserError(f"{first_collector}: not found; the run kept no controller of its first dream's end")
        params, meta = load_controller(first_collector)
        if meta.get("m") != first:
            raise UserError(f"{first_collector}: played with M {meta.get('m')}, not the first M ({first})")
    out.mkdir(parents=True)
    for name in ("episodes", "latents"):  # the first dream's data; an iteration's files would stop its collection
        (out / name).mkdir()
        for path in sorted((src / name).glob("ep_*.npz")):
            if episode_index(path) < run.cfg.collect.episodes:
                os.link(path, out / name / path.name)
    for name in ["vae.pt", "vae_ckpt.pt", "controller.pt", "config.yaml", "episodes/manifest.json"] + (
            [SELECT_FILE] if critics == "all" else []):
        if (src / name).exists():  # with its time: V older than the latents, so they are not encoded again
            shutil.copy2(src / name, out / name)
    iterate = ["iterate.iterations=0"] if not critic_iterations else [
        f"iterate.iterations={critic_iterations}", "iterate.search=false"]
    cut = open_run(out, None, overrides=iterate)
    cut.m_history_index.parent.mkdir()
    for m_id in ids if critics == "all" else [first]:
        for member in range(run.m_files):
            os.link(run.m_snapshot_path(m_id, member), cut.m_snapshot_path(m_id, member))
        cut.record_m_snapshot(m_id)
    for member in range(run.m_files):
        shutil.copyfile(run.m_snapshot_path(first, member), cut.member_path(member))
    save_state(cut.path(STATE_FILE), state)
    if critic_iterations:
        (cut.dir / COLLECTORS_DIR).mkdir()
        for i in range(1, critic_iterations + 1):
            save_controller(cut.dir / COLLECTORS_DIR / f"iteration_{i}.pt", params, {**meta, "iteration": i})
        # The first critic's training state, with a fresh Adam (the run kept no older one).
        member = cut.cfg.model.ensemble
        critic = load_m(cut.member_path(member), cut.cfg)
        save_training_state(cut, critic, torch.optim.Adam(critic.parameters(), lr=cut.cfg.model.lr),
                            cut.cfg.model.epochs, member)
    return state["checks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder after `iterate`")
    parser.add_argument("--out", required=True, help="the new run folder (must not exist)")
    parser.add_argument("--critics", choices=("first", "all"), default="first",
                        help="the shield's critics: the first M's alone, or the run's every M's")
    parser.add_argument("--critic-iterations", type=int, default=0, metavar="K",
                        help="then K critic-only iterations (iterate.search: false), before select")
    parser.add_argument("--no-select", action="store_true", help="only build the folder")
    args = parser.parse_args()
    if args.critic_iterations and args.critics != "first":
        parser.error("--critic-iterations trains the critics the shield averages: use it with --critics first")

    from agents.iterate import iterate
    from agents.pipeline import select
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        checks = build(Path(args.run), Path(args.out), args.critics, max(args.critic_iterations, 0))
        print(f"{args.out}: the first dream's checks " +
              ", ".join(f"generation {ch['generation']} {ch['real_score']:.1f}" for ch in checks))
        if args.critic_iterations > 0 and not args.no_select:
            iterate(open_run(args.out, None, create=False))
        if not args.no_select:
            summary = select(open_run(args.out, None, create=False))
            print(f"select kept generation {summary['selected']}: {summary['select_score']:.1f} "
                  f"(candidates: {summary['candidates']})" if "select_score" in summary
                  else f"select: {summary['selected']}")
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
