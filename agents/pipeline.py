"""`python run.py dream` (CMA-ES in the dream, with real-env checks) and `pipeline`.

``pipeline`` runs collect -> train-vae -> train-rnn -> dream -> iterate (when
``iterate.iterations`` > 0) -> select (when ``cmaes.select_episodes`` > 0) -> evaluate
on one run folder; each stage resumes or skips what is already done, so running the
same command again continues where it stopped.
"""

from __future__ import annotations

import json
import time

import numpy as np

from agents.collect import collect
from agents.evaluate import evaluate_params, evaluate_run, scores
from worldmodel.io import append_jsonl
from worldmodel.runs import Run


def _real_check(run: Run, workers: int | None, backend: str | None):
    def real_check(params: np.ndarray | None, episodes: int, seed: int, m_path=None, committee=None) -> list[float]:
        return evaluate_params(run, params, episodes, seed, workers, backend, m_path, committee)

    return real_check


def dream(run: Run, workers: int | None = None, backend: str | None = None, progress: bool = True) -> dict:
    """Evolve the controller in M's dream; check the best in the real game every few generations.

    The real checks play the seeds train_controller passes (1,000,000 + cmaes.seed ...): apart
    from collection (hashed seeds) and from the final evaluation (eval.seed ...).
    """
    from agents.calibrate import real_pacer
    from agents.cmaes import train_controller

    pacer = real_pacer(run, workers, backend) if run.cfg.cmaes.done_calibration > 0 else None
    return train_controller(run, evaluate_fn=_real_check(run, workers, backend) if run.cfg.cmaes.eval_every
                            else None, progress=progress, pacer=pacer)


def select(run: Run, workers: int | None = None, backend: str | None = None) -> dict:
    """Keep the best of the best-checked controllers on fresh real episodes (agents/select.py)."""
    from agents.select import select_controller

    return select_controller(run, _real_check(run, workers, backend))


def _current_report(run: Run) -> dict | None:
    """eval.json when it scored the current controller on (at least) the episodes the config asks for.

    None when there is none, when the controller (or select's committee) is newer, or when it
    covers fewer episodes or other seeds than ``eval`` names (e.g. after ``--set eval.episodes=100``).
    """
    path, controller, committee = run.path("eval.json"), run.controller_path, run.committee_path
    if not (path.exists() and controller.exists() and path.stat().st_mtime > controller.stat().st_mtime):
        return None
    members = run.cfg.controller.committee if run.cfg.controller.committee > 1 and committee.exists() else 1
    if members > 1 and committee.stat().st_mtime > path.stat().st_mtime:
        return None
    cfg = run.cfg.eval
    try:
        report = json.loads(path.read_text())
        episodes = report["agent"]["episodes"]
        covers = (report["env"] == run.cfg.env.name and report["seeds"][0] == cfg.seed
                  and episodes >= cfg.episodes and report["random"]["episodes"] == episodes
                  and report.get("real_noise", 0.0) == run.cfg.controller.real_noise
                  and report.get("shield", 0.0) == run.cfg.controller.shield
                  and report.get("committee", 1) == members
                  and (not cfg.pacer_steps or report.get("pacing", {}).get("pacer_steps") == cfg.pacer_steps))
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # unreadable: evaluate again
        return None
    return report if covers else None


def pipeline(run: Run, workers: int | None = None, backend: str | None = None, skip_bad: bool = False,
             progress: bool = True) -> dict:
    """All stages on one run folder; prints each stage's summary and the final scores."""
    from agents.iterate import iterate
    from worldmodel.train_m import train_m
    from worldmodel.train_vae import train_vae

    stages = [
        ("collect", lambda: collect(run, workers=workers, backend=backend, progress=progress)),
        ("train-vae", lambda: train_vae(run, skip_bad=skip_bad, progress=progress)),
        ("train-rnn", lambda: train_m(run, skip_bad=skip_bad)),
        ("dream", lambda: dream(run, workers=workers, backend=backend, progress=progress)),
    ]
    if run.cfg.iterate.iterations:
        stages.append(("iterate", lambda: iterate(run, workers=workers, backend=backend, skip_bad=skip_bad,
                                                  progress=progress)))
    if run.cfg.cmaes.select_episodes:
        stages.append(("select", lambda: select(run, workers=workers, backend=backend)))
    summaries = {}
    for name, stage in stages:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        summaries[name] = stage()
        seconds = time.perf_counter() - start
        append_jsonl(run.metrics_path("pipeline"), {"stage": name, "seconds": seconds, "time": time.time()})
        print(f"   {name} done in {seconds:.0f} s", flush=True)
    print("== evaluate", flush=True)
    report = _current_report(run)
    if report is not None:
        print(f"   {run.path('eval.json')} already scores this controller: kept (delete it to re-evaluate)")
        result = scores(report)
    else:
        start = time.perf_counter()
        result = evaluate_run(run, workers=workers, backend=backend, progress=progress)
        append_jsonl(run.metrics_path("pipeline"), {"stage": "evaluate", "seconds": time.perf_counter() - start,
                                                    "time": time.time()})
    for line in score_lines(run.cfg.env.name, result):
        print(line)
    summaries["evaluate"] = result
    return summaries


#: The lines of :func:`agents.evaluate.scores` the pipeline ends with, in order, and where each was played.
_SCORE_LINES = (("real", "agent", "agent"), ("real", "committee", "committee"), ("real", "shield", "shield"),
                ("real", "random policy", "random policy"), ("dream", "agent in the dream", "agent"),
                ("real", "blind pacer", "blind pacer"), ("dream", "blind pacer in the dream", "blind pacer"))


def score_lines(env: str, result: dict[str, str]) -> list[str]:
    """The pipeline's last lines: the real score, the shield's share of it, the baselines, the dream's."""
    return [f"{where} {env}: {label} {result[key]}" for where, key, label in _SCORE_LINES if key in result]
