"""`python run.py iterate`: the paper's iterative training, after a first dream.

Ha & Schmidhuber (2018, section 5): a model trained on random rollouts only knows the
parts of the world a random policy visits, and a controller evolved in it finds the
places where the model is wrong (here: a dream where pressing against a wall keeps the
agent alive).  Iterating closes that gap.  Iteration i (1 … ``iterate.iterations``):

1. **collect** ``iterate.episodes`` real episodes with the current agent (V, M and the
   centre of CMA-ES's distribution), its actions perturbed by Gaussian noise of std ``iterate.noise``;
   they join the run's episodes; with ``iterate.noise`` 0 (the agent as it plays, noise from
   ``controller.real_noise``) their mean return joins the real checks as that controller's
   score, so ``select`` can pick it (:func:`_collector_check`);
2. **encode** them with V (or, with ``iterate.vae_epochs`` > 0, train V that many more
   epochs on all frames and re-encode everything);
3. **train M** ``iterate.m_epochs`` more epochs on all the data, from its current
   weights and Adam state;
4. **dream**: continue CMA-ES ``iterate.generations`` more generations in the new
   dream; its last generation is checked in the real game.  With ``iterate.restart``
   the search starts afresh there (``cmaes.sigma0``; :func:`agents.cmaes.restart_search`),
   so a centre saturated by an exploited dream does not carry over: centred on 0, or with
   ``iterate.restart_from: best`` on the best real check so far, which the new dream refines
   (the real game picks where the search starts; the controller is still trained only in dreams),
   when it beats the mean return of the ``collect`` stage's episodes (else from 0).

With ``iterate.search: false`` an iteration is a **critic-only iteration**: it collects (1) and
encodes (2) as above with the first dream's agent, then trains only the hazard critic
(``model.hazard_horizon``) ``iterate.m_epochs`` more epochs on all the data, and keeps the
run's M files with that critic in ``m_history/``.  No dream, no new search, the dream's M's
stay: what the iterations add is critics trained on the agent's own play, which the shield
averages (``controller.shield_critics``) around the agent's own (docs/results.md, "The
iterations' worth is in their critics" and "Critic-only iterations").

Every count is cumulative: iteration i asks for ``collect.episodes + i × iterate.episodes``
episodes, ``model.epochs + i × iterate.m_epochs`` M epochs, and so on.  So each step
is the ordinary resumable stage with a larger target, and rerunning ``iterate`` after
a kill continues where it stopped.  ``metrics/iterate.jsonl`` gets one record per
finished iteration (the noisy agent's real return while collecting, M's validation
loss, the dream and real scores at the iteration's end); a recorded iteration is not
run again.  The controller that collects iteration i is kept in ``collectors/iteration_<i>.pt``,
so an iteration resumed after its dream has moved the centre still collects, and reports,
with the one it began with.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from agents.cmaes import (
    STATE_FILE,
    add_check,
    best_check,
    current_m_id,
    keep_m_snapshot,
    load_state,
    restart_search,
)
from agents.collect import collect_agent, manifest_returns
from agents.controller import load_controller, save_controller
from worldmodel.episodes import read_manifest
from worldmodel.errors import UserError
from worldmodel.io import append_jsonl, read_jsonl
from worldmodel.runs import Run

METRICS = "iterate"
COLLECTORS_DIR = "collectors"


def iteration_run(run: Run, i: int) -> Run:
    """The run as iteration ``i`` sees it: every stage's target raised i times (0: the base run)."""
    cfg, it = run.cfg, run.cfg.iterate
    cfg = dataclasses.replace(
        cfg,
        collect=dataclasses.replace(cfg.collect, episodes=cfg.collect.episodes + i * it.episodes),
        vae=dataclasses.replace(cfg.vae, epochs=cfg.vae.epochs + i * it.vae_epochs),
        model=dataclasses.replace(cfg.model, epochs=cfg.model.epochs + i * it.m_epochs),
        cmaes=dataclasses.replace(cfg.cmaes, generations=cfg.cmaes.generations + i * it.generations),
    )
    return Run(dir=run.dir, cfg=cfg)


def _last_real_check(run: Run) -> dict[str, Any]:
    checks = [r for r in read_jsonl(run.metrics_path("dream")) if r.get("real_mean") is not None]
    return checks[-1] if checks else {}


def _current_controller(run: Run) -> tuple[np.ndarray, int]:
    """The centre of CMA-ES's distribution now, and its generation: where the dream is being exploited.

    Not ``controller.pt``, which is the best real check so far and may be many generations old.
    """
    state = load_state(run.path(STATE_FILE))
    return np.asarray(state["es"].mean, np.float32), int(state["generation"])


def _collector(run: Run, i: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The controller that collects iteration ``i``'s episodes and its metadata (``generation``;
    ``m``, the fingerprint of the M it plays with, kept in ``m_history/``): the centre when the
    iteration began, kept in ``collectors/iteration_<i>.pt`` for a resumed iteration."""
    path = run.dir / COLLECTORS_DIR / f"iteration_{i}.pt"
    if path.exists():
        return load_controller(path)
    params, generation = _current_controller(run)
    m_id = current_m_id(run)
    keep_m_snapshot(run, m_id)
    meta = {"iteration": i, "generation": generation, "m": m_id}
    path.parent.mkdir(exist_ok=True)
    save_controller(path, params, meta)
    return params, meta


def _collector_check(run: Run, i: int, params: np.ndarray, meta: dict[str, Any], collected: dict) -> None:
    """The collector's return over the iteration's episodes, as a real check for ``select``.

    The dream checks the centre *before* a generation's update; the collector is the centre
    after the iteration's last one, which no check has played.  With ``iterate.noise`` 0 it plays
    as checks, ``select`` and ``evaluate`` play (``controller.real_noise`` included), on
    ``iterate.episodes`` tracks instead of a check's ``cmaes.eval_episodes``.  With more noise its
    return scores another policy, and a collector from before ``m`` was recorded played with an
    unknown M: neither is a candidate."""
    if run.cfg.iterate.noise > 0 or "m" not in meta:
        return
    add_check(run, {"key": f"collector {i}", "params": np.asarray(params, np.float32),
                    "generation": int(meta["generation"]), "real_score": float(collected["mean_return"]),
                    "m": meta["m"]})


def _data_policy_return(run: Run) -> float:
    """The mean return of the ``collect`` stage's episodes (held-random play, say), from the
    episode manifest: a controller that does no better is not worth refining; -inf when unknown."""
    folder = run.episodes_dir
    returns = manifest_returns(read_manifest(folder)["episodes"], folder, range(run.cfg.collect.episodes))
    return float(np.mean(returns)) if returns else float("-inf")


def _require_dream(run: Run) -> None:
    state = run.path(STATE_FILE)
    if not state.exists():
        raise UserError(f"{state}: not found; iterate continues the dream's CMA-ES: "
                        "run `python run.py dream` (or `pipeline`) first")


def iterate(run: Run, workers: int | None = None, backend: str | None = None, skip_bad: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run the iterations ``iterate.iterations`` asks for; skip those already recorded."""
    from agents.pipeline import dream
    from worldmodel.train_m import train_m, train_member
    from worldmodel.train_vae import train_vae

    it = run.cfg.iterate
    if it.iterations == 0:
        raise UserError("config iterate.iterations is 0: nothing to do (e.g. --set iterate.iterations=3)")
    _require_dream(run)
    metrics = run.metrics_path(METRICS)
    records = read_jsonl(metrics)
    done = {int(r["iteration"]) for r in records}
    for i in range(1, it.iterations + 1):
        if i in done:
            continue
        prev, cur = iteration_run(run, i - 1), iteration_run(run, i)
        print(f"== iteration {i}/{it.iterations}", flush=True)
        seconds: dict[str, float] = {}

        start = time.perf_counter()
        params, collector = _collector(run, i)
        generation = int(collector["generation"])
        first = prev.cfg.collect.episodes
        collected = collect_agent(run, range(first, cur.cfg.collect.episodes), params, it.noise,
                                  workers, backend, progress)
        _collector_check(run, i, params, collector, collected)
        seconds["collect"] = time.perf_counter() - start

        start = time.perf_counter()
        # With no V epochs to add, this only encodes the new episodes (frames read from their files).
        train_vae(cur, skip_bad=skip_bad, progress=progress)
        seconds["encode"] = time.perf_counter() - start

        if not it.search:
            start = time.perf_counter()
            critic = train_member(cur, cur.cfg.model.ensemble, skip_bad=skip_bad)
            keep_m_snapshot(run, current_m_id(run))  # the new critic joins those the shield averages
            seconds["train_critic"] = time.perf_counter() - start
            record = {"iteration": i, "search": False, "episodes": cur.cfg.collect.episodes,
                      "collected_by": {"generation": generation, "noise": it.noise},
                      "collect_return": collected["mean_return"], "critic_val_loss": critic.get("val/loss"),
                      "generation": generation, "centre_dream": None, "real_mean": None, "real_std": None,
                      **_best_check(run), "seconds": seconds, "time": time.time()}
            append_jsonl(metrics, record)
            records.append(record)
            print(f"   iteration {i}: noisy agent collected {collected['mean_return']:.1f}; "
                  f"critic trained to epoch {critic.get('epoch')}", flush=True)
            continue

        start = time.perf_counter()
        m_summary = train_m(cur, skip_bad=skip_bad) if it.m_epochs > 0 else {}
        seconds["train_m"] = time.perf_counter() - start

        start = time.perf_counter()
        if it.restart:
            restart_search(cur, i, best_above=_data_policy_return(run) if it.restart_from == "best" else None)
        dream_summary = dream(cur, workers=workers, backend=backend, progress=progress)
        seconds["dream"] = time.perf_counter() - start

        check = _last_real_check(cur)
        record = {
            "iteration": i,
            "episodes": cur.cfg.collect.episodes,
            "collected_by": {"generation": generation, "noise": it.noise},
            "restarted": it.restart,
            **({"restarted_from": it.restart_from} if it.restart else {}),
            "collect_return": collected["mean_return"],
            "m_val_loss": m_summary.get("val/loss"),
            "m_val_z_nll": m_summary.get("val/z_nll"),
            "generation": dream_summary["generations"],
            "centre_dream": check.get("centre_dream"),
            "real_mean": check.get("real_mean"),
            "real_std": check.get("real_std"),
            "best_real_score": dream_summary["best_real_score"],
            "best_real_generation": dream_summary["best_real_generation"],
            "seconds": seconds,
            "time": time.time(),
        }
        append_jsonl(metrics, record)
        records.append(record)
        print(f"   iteration {i}: noisy agent collected {collected['mean_return']:.1f}; "
              f"dream {_fmt(record['centre_dream'])}, real {_fmt(record['real_mean'])} "
              f"(generation {record['generation']})", flush=True)
    last = records[-1]
    return {"iterations": len(records), "episodes": last["episodes"], "generation": last["generation"],
            "last_dream": last["centre_dream"], "last_real": last["real_mean"],
            "best_real_score": last["best_real_score"], "best_real_generation": last["best_real_generation"],
            "controller_path": str(run.controller_path)}


def _best_check(run: Run) -> dict[str, Any]:
    """The best real check of the search so far (a critic-only iteration adds none)."""
    best = best_check([ch for ch in load_state(run.path(STATE_FILE)).get("checks", []) if "key" not in ch])
    return {"best_real_score": None if best is None else float(best["real_score"]),
            "best_real_generation": None if best is None else int(best["generation"])}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"

