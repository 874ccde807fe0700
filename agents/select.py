"""Pick the controller to keep: the best few real checks, played again on fresh episodes.

While CMA-ES runs (``dream``, ``iterate``), the centre of its distribution is checked in the
real game every ``cmaes.eval_every`` generations, always on the same ``cmaes.eval_episodes``
episodes, so that checks compare on equal luck.  The best of many such checks overstates its
controller: it was picked for scoring high on those few episodes (run tc1b scored 914 on its 16
check episodes and 692 on 100 held-out ones).  :func:`select_controller` plays the
``cmaes.select_top`` best-checked controllers on ``cmaes.select_episodes`` fresh episodes
(seeds 2,000,000 + ``cmaes.seed`` …, used by nothing else) and keeps the one with the best mean
there.  C reads M's h, so each controller is played with the M it was checked with: a
controller checked before an iteration retrained M would do worse with the new one (run tc7 in
docs/results.md: generation 260 fell from 730.6 to 593.2 on the same 64 episodes).  The dream
keeps a copy of every M it checks controllers with (``m_history/<fingerprint>.pt``, and an
ensemble's other members beside it; :func:`agents.cmaes.keep_m_snapshot`), so the checks of
every iteration are candidates; checks whose M was not kept (a run from before the copies) count
only with the current M.  ``iterate``'s collectors count as checks too, scored by the episodes
they collected (agents/iterate.py).  When the winner was checked with an earlier M, that M becomes the run's
``m.pt`` again (``m1.pt`` ... too, for an ensemble; the training state stays in ``m_ckpt.pt``), so
that the agent in ``evaluate`` and ``watch``, and its dream, are the ones that were selected.

Scores are cached in ``select.json`` per (episodes, seed, how the agent acts: ``controller.real_z``,
``controller.action_noise``, ``controller.real_noise`` and CarRacing's ``controller.brake``) and
generation, so a rerun plays only controllers not yet scored under the same rules;
``controller.pt`` is rewritten only when the choice changes.

With ``controller.committee`` = N > 1 the N best on the fresh episodes are also played together
(:class:`agents.agent.Committee`: each with its own M, the median action) on the same episodes;
where they beat the best alone they are kept in ``committee.pt`` for ``evaluate``, else it is removed.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np

from agents.cmaes import STATE_FILE, EvaluateFn, check_key, current_m_id, load_state, m_snapshot_path
from agents.controller import load_controller, save_committee, save_controller
from worldmodel.config import LEGACY_BRAKE
from worldmodel.io import atomic_path, load_checkpoint, write_json
from worldmodel.runs import Run

SELECT_SEED_BASE = 2_000_000
SELECT_FILE = "select.json"


def read_cache(run: Run) -> dict[str, Any]:
    """``select.json``: {episodes and how the agent acts: {check: its score there}}."""
    path = run.path(SELECT_FILE)
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # torn or edited by hand: score again
        cache = {}
    return cache if isinstance(cache, dict) else {}


def _cache_key(run: Run, seed: int) -> str:
    """Which episodes, and how the agent plays them: a score holds only for the same of both."""
    ctl = run.cfg.controller
    acting = f", real z {ctl.real_z}" + (f", action noise {ctl.action_noise:g}" if ctl.action_noise else "")
    acting += f", real-game noise {ctl.real_noise:g}" if ctl.real_noise else ""
    acting += f", shield {ctl.shield:g}" if ctl.shield else ""
    acting += f" over {ctl.shield_critics} critics" if ctl.shield and ctl.shield_critics > 1 else ""
    if run.cfg.env.name == "carracing" and ctl.brake != LEGACY_BRAKE:  # so caches from before the key still hold
        acting += f", brake {ctl.brake}"
    return f"{run.cfg.cmaes.select_episodes} episodes from seed {seed}{acting}"


def _name(check: dict[str, Any]) -> str:
    key = check_key(check)
    return f"generation {key}" if key == str(check["generation"]) else key


def candidates(run: Run, checks: list[dict[str, Any]], m_id: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """The ``cmaes.select_top`` best of ``checks`` that can be played again: every one for a run
    from before checks named their M, else those checked with the current M (fingerprint ``m_id``;
    None: computed from the run's M files) or with one kept in ``m_history/``.  Returns them best
    check first, and ``m_id``."""
    if any(ch.get("m") for ch in checks):
        if m_id is None:
            m_id = current_m_id(run)
        checks = [ch for ch in checks if ch.get("m") == m_id or m_snapshot_path(run, ch["m"]).exists()]
    return sorted(checks, key=lambda ch: -ch["real_score"])[: run.cfg.cmaes.select_top], m_id


def earlier_m(run: Run, check: dict[str, Any], m_id: str | None) -> dict[str, Any]:
    """``{"m_path": ...}`` for a check played with an M other than the current one, else {}:
    the keyword arguments of :data:`EvaluateFn` that play its controller with its own M."""
    return {"m_path": m_snapshot_path(run, check["m"])} if check.get("m") not in (None, m_id) else {}


def select_controller(run: Run, evaluate_fn: EvaluateFn, m_id: str | None = None) -> dict[str, Any]:
    """Play the best-checked controllers on fresh episodes; write the winner to ``controller.pt``.

    evaluate_fn(params (P,), episodes, seed[, m_path=...]) -> real returns; ``m_path`` is passed
    for a controller checked with an earlier M.  ``m_id``: fingerprint of the current M (None:
    computed from the run's M files when a check names one).  Returns a summary.
    """
    c = run.cfg.cmaes
    state_path = run.path(STATE_FILE)
    if c.select_episodes == 0 or not state_path.exists():
        return {"selected": "off (cmaes.select_episodes is 0)" if c.select_episodes == 0
                else f"skipped ({state_path} not found)"}
    checks = load_state(state_path).get("checks", [])
    if not checks:
        return {"selected": "skipped (no real checks to choose from)"}
    top, m_id = candidates(run, checks, m_id)
    if not top:
        return {"selected": "skipped (no real check was played with the current M or a kept one; "
                            "run `dream` on)"}
    seed = SELECT_SEED_BASE + c.seed
    cache = read_cache(run)
    scores = cache.setdefault(_cache_key(run, seed), {})
    for check in top:
        key = check_key(check)
        if key not in scores or scores[key].get("m") != check.get("m"):
            returns = np.asarray(evaluate_fn(check["params"].copy(), c.select_episodes, seed,
                                             **earlier_m(run, check, m_id)),
                                 np.float64)
            scores[key] = {"mean": float(returns.mean()), "std": float(returns.std()),
                           "check_score": float(check["real_score"]), "m": check.get("m")}
            write_json(run.path(SELECT_FILE), cache)
            print(f"   select: {_name(check)}: check {check['real_score']:.1f}, "
                  f"{c.select_episodes} fresh episodes {returns.mean():.1f} ± {returns.std():.1f}", flush=True)
    ranked = sorted(top, key=lambda ch: -scores[check_key(ch)]["mean"])
    best = ranked[0]
    chosen = scores[check_key(best)]
    committee = _committee(run, ranked, scores, cache, evaluate_fn, seed, m_id)
    if best.get("m") not in (None, m_id):  # checked with an earlier M: the agent plays with that one
        for k in range(run.m_files):
            with atomic_path(run.member_path(k)) as tmp:
                shutil.copyfile(m_snapshot_path(run, best["m"], k), tmp)
        print(f"   select: {_name(best)} was checked with an earlier M; "
              f"{run.m_path} is that M again ({m_snapshot_path(run, best['m']).name})", flush=True)
    current, meta = load_controller(run.controller_path)
    if not np.array_equal(current, best["params"]):
        dream_score = best.get("dream_score")  # none for a collector (agents/iterate.py)
        meta.update(source="select", generation=int(best["generation"]), check=check_key(best),
                    dream_score=None if dream_score is None else float(dream_score),
                    real_score=float(best["real_score"]), select_score=chosen["mean"],
                    select_episodes=c.select_episodes, **({"m": best["m"]} if best.get("m") else {}))
        save_controller(run.controller_path, best["params"], meta)
    return {"selected_generation": int(best["generation"]), "selected": check_key(best),
            "select_score": chosen["mean"], "m": best.get("m"),
            "select_std": chosen["std"], "check_score": chosen["check_score"],
            "candidates": {check_key(ch): scores[check_key(ch)]["mean"] for ch in top},
            **committee, "controller_path": str(run.controller_path)}


def _committee(run: Run, ranked: list[dict[str, Any]], scores: dict[str, Any], cache: dict[str, Any],
               evaluate_fn: EvaluateFn, seed: int, m_id: str | None) -> dict[str, Any]:
    """With ``controller.committee`` = N > 1: play the N best of ``ranked`` (select's candidates, best
    first) together on select's episodes, and keep them in ``committee.pt`` where their mean beats
    the best's alone; otherwise, or with N = 1, no ``committee.pt``.  -> summary lines."""
    path, n = run.committee_path, run.cfg.controller.committee
    members = ranked[:n]
    if n < 2 or len(members) < n:
        path.unlink(missing_ok=True)
        return {} if n < 2 else {"committee": f"none ({len(members)} candidates for {n} members)"}
    key = "committee of " + ", ".join(check_key(ch) for ch in members)
    ms = [ch.get("m") for ch in members]
    if key not in scores or scores[key].get("m") != ms:
        returns = np.asarray(evaluate_fn(None, run.cfg.cmaes.select_episodes, seed, committee=[
            (ch["params"].copy(), earlier_m(run, ch, m_id).get("m_path")) for ch in members]), np.float64)
        scores[key] = {"mean": float(returns.mean()), "std": float(returns.std()), "m": ms}
        write_json(run.path(SELECT_FILE), cache)
    score, alone = scores[key]["mean"], scores[check_key(members[0])]["mean"]
    names = ", ".join(_name(ch) for ch in members)
    print(f"   select: {names} together: {run.cfg.cmaes.select_episodes} fresh episodes {score:.1f} ± "
          f"{scores[key]['std']:.1f} ({'kept' if score > alone else 'not kept'}: {_name(members[0])} "
          f"alone {alone:.1f})", flush=True)
    if score <= alone:
        path.unlink(missing_ok=True)
        return {"committee": f"not kept ({names}: {score:.1f}, the best alone {alone:.1f})"}
    params, m_ids = np.stack([ch["params"] for ch in members]).astype(np.float32), [m or "" for m in ms]
    kept = load_checkpoint(path) if path.exists() else {}
    if not (np.array_equal(np.asarray(kept.get("params")), params) and kept.get("m") == m_ids):  # else as it is
        save_committee(path, params, m_ids, {"members": [check_key(ch) for ch in members], "select_score": score,
                                             "select_episodes": run.cfg.cmaes.select_episodes})
    return {"committee": f"kept ({names})", "committee_score": score}
