"""`python run.py dream` (CMA-ES in the dream, with real-env checks) and `pipeline`.

``pipeline`` runs collect -> train-vae -> train-rnn -> dream -> evaluate on one
run folder; each stage resumes or skips what is already done, so running the
same command again continues where it stopped.
"""

from __future__ import annotations

import time

import numpy as np

from agents.collect import collect
from agents.evaluate import evaluate_params, evaluate_run
from worldmodel.io import append_jsonl
from worldmodel.runs import Run

#: Real-env checks during `dream` use their own seeds: apart from collection (hashed seeds)
#: and from the final evaluation (eval.seed ...), so the reported score is on unseen episodes.
SELECTION_SEED = 1_000_000


def dream(run: Run, workers: int | None = None, backend: str | None = None, progress: bool = True) -> dict:
    """Evolve the controller in M's dream; check the best in the real game every few generations."""
    from agents.cmaes import train_controller

    def real_check(params: np.ndarray, episodes: int, seed: int = SELECTION_SEED) -> list[float]:
        return evaluate_params(run, params, episodes, SELECTION_SEED, workers, backend)

    return train_controller(run, evaluate_fn=real_check if run.cfg.cmaes.eval_every else None,
                            progress=progress)


def _eval_current(run: Run) -> bool:
    """eval.json exists and is newer than the controller it scored."""
    report, controller = run.path("eval.json"), run.controller_path
    return report.exists() and controller.exists() and report.stat().st_mtime > controller.stat().st_mtime


def pipeline(run: Run, workers: int | None = None, backend: str | None = None, skip_bad: bool = False,
             progress: bool = True) -> dict:
    """All stages on one run folder; prints each stage's summary and the final scores."""
    from worldmodel.train_m import train_m
    from worldmodel.train_vae import train_vae

    stages = [
        ("collect", lambda: collect(run, workers=workers, backend=backend, progress=progress)),
        ("train-vae", lambda: train_vae(run, skip_bad=skip_bad, progress=progress)),
        ("train-rnn", lambda: train_m(run, skip_bad=skip_bad)),
        ("dream", lambda: dream(run, workers=workers, backend=backend, progress=progress)),
    ]
    summaries = {}
    for name, stage in stages:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        summaries[name] = stage()
        seconds = time.perf_counter() - start
        append_jsonl(run.metrics_path("pipeline"), {"stage": name, "seconds": seconds, "time": time.time()})
        print(f"   {name} done in {seconds:.0f} s", flush=True)
    print("== evaluate", flush=True)
    if _eval_current(run):
        print(f"   {run.path('eval.json')} is newer than the controller: kept (delete it to re-evaluate)")
        import json

        report = json.loads(run.path("eval.json").read_text())
        a, r = report["agent"], report["random"]
        result = {"agent": f"{a['mean']:.1f} ± {a['std']:.1f} over {a['episodes']} episodes",
                  "random policy": f"{r['mean']:.1f} ± {r['std']:.1f} on the same seeds"}
    else:
        start = time.perf_counter()
        result = evaluate_run(run, workers=workers, backend=backend, progress=progress)
        append_jsonl(run.metrics_path("pipeline"), {"stage": "evaluate", "seconds": time.perf_counter() - start,
                                                    "time": time.time()})
    print(f"real {run.cfg.env.name}: agent {result['agent']}")
    print(f"real {run.cfg.env.name}: random policy {result['random policy']}")
    summaries["evaluate"] = result
    return summaries
