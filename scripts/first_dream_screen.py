"""A finished run cut back to its first dream: what `iterate` added, with nothing trained anew.

    python scripts/first_dream_screen.py --run runs/z3a0 --out runs/ni0 [--critics first|all] [--no-select]

Builds ``--out`` from a run that has iterated: hard links to its episodes, latents and
``m_history/`` files, copies of V and its config with ``iterate.iterations: 0``; its first M (the
one the first dream's checks were played with: every member and the critic) becomes the run's M,
and ``cmaes.pkl`` keeps only those checks.  ``--critics first`` keeps only that M in
``m_history/``, so the shield has its one critic: the agent the same seeds make with
``iterate.iterations: 0``.  ``--critics all`` keeps every M of the run, so the shield averages
the first critic with the iterations' (``controller.shield_critics``), as the run's own ``select``
played them, and copies the run's ``select.json`` (its scores of these controllers hold).
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


def build(src: Path, out: Path, critics: str) -> list[dict]:
    """Write the cut-back run folder; returns the checks it keeps."""
    from agents.cmaes import STATE_FILE, load_state, save_state
    from agents.select import SELECT_FILE
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

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
    out.mkdir(parents=True)
    for name in ("episodes", "latents"):
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, copy_function=os.link)
    for name in ["vae.pt", "controller.pt", "config.yaml"] + ([SELECT_FILE] if critics == "all" else []):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    cut = open_run(out, None, overrides=["iterate.iterations=0"])
    cut.m_history_index.parent.mkdir()
    for m_id in ids if critics == "all" else [first]:
        for member in range(run.m_files):
            os.link(run.m_snapshot_path(m_id, member), cut.m_snapshot_path(m_id, member))
        cut.record_m_snapshot(m_id)
    for member in range(run.m_files):
        shutil.copyfile(run.m_snapshot_path(first, member), cut.member_path(member))
    save_state(cut.path(STATE_FILE), state)
    return state["checks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder after `iterate`")
    parser.add_argument("--out", required=True, help="the new run folder (must not exist)")
    parser.add_argument("--critics", choices=("first", "all"), default="first",
                        help="the shield's critics: the first M's alone, or the run's every M's")
    parser.add_argument("--no-select", action="store_true", help="only build the folder")
    args = parser.parse_args()

    from agents.pipeline import select
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    try:
        checks = build(Path(args.run), Path(args.out), args.critics)
        print(f"{args.out}: the first dream's checks " +
              ", ".join(f"generation {ch['generation']} {ch['real_score']:.1f}" for ch in checks))
        if not args.no_select:
            summary = select(open_run(args.out, None, create=False))
            print(f"select kept generation {summary['selected']}: {summary['select_score']:.1f} "
                  f"(candidates: {summary['candidates']})" if "select_score" in summary
                  else f"select: {summary['selected']}")
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
