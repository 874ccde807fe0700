"""`python run.py pipeline` end to end on configs/smoke.yaml, then again: the rerun trains nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE

from agents.cmaes import load_state, weights_fingerprint
from agents.pipeline import _current_report
from worldmodel.io import write_json
from worldmodel.runs import open_run
from worldmodel.train_m import load_m

STAGES = ("collect", "train-vae", "train-rnn", "dream", "iterate", "select", "evaluate")
#: What a finished stage made; a rerun must leave every byte and mtime as it was.
#: (plots are redrawn and dream.jsonl is rewritten from the CMA-ES state.)
KEPT = ("episodes", "latents", "vae.pt", "vae_ckpt.pt", "m.pt", "m_ckpt.pt", "m_history", "cmaes.pkl",
        "controller.pt", "select.json", "controller_dream.pt", "eval.json")


def _pipeline(run_dir: Path, log: Path) -> tuple[subprocess.CompletedProcess, float]:
    # Output to a file, not a pipe: a game process that outlived its stage would hold a pipe open.
    start = time.monotonic()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "run.py", "pipeline", "--config", str(SMOKE), "--run",
                                 str(run_dir), "--quiet"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result, time.monotonic() - start


def _snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    files = [p for name in KEPT for p in ([run_dir / name] if (run_dir / name).is_file()
                                           else sorted((run_dir / name).rglob("*")))]
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in files if p.is_file()}


def _metrics(run_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "metrics").glob("*.jsonl"))}


def _score_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("real takecover: ")]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    run_dir, log = root / "run", root / "first.log"
    result, seconds = _pipeline(run_dir, log)
    assert result.returncode == 0, log.read_text()[-3000:]
    return {"dir": run_dir, "root": root, "log": log.read_text(), "seconds": seconds,
            "snapshot": _snapshot(run_dir), "metrics": _metrics(run_dir)}


def test_pipeline_runs_every_stage_and_prints_both_scores(first):
    log, run_dir = first["log"], first["dir"]
    positions = [log.index(f"== {stage}\n") for stage in STAGES]
    assert positions == sorted(positions)
    assert log.index("\ncompute: ") < positions[0]  # what V, M and the dream run on, before any stage
    assert len(list((run_dir / "episodes").glob("ep_*.npz"))) == 4 + 2  # collect.episodes + iterate.episodes
    assert len(list((run_dir / "latents").glob("ep_*.npz"))) == 4 + 2
    assert [r["generation"] for r in first["metrics"]["dream"]] == [1, 2, 3]  # + iterate.generations
    assert [r["iteration"] for r in first["metrics"]["iterate"]] == [1]
    assert json.loads((run_dir / "select.json").read_text())  # the best checks played again
    # Every M a real check was played with is kept under its fingerprint, for select.
    run = open_run(run_dir, None, create=False)
    checked = {check["m"] for check in load_state(run_dir / "cmaes.pkl")["checks"]}
    kept = sorted((run_dir / "m_history").glob("*.pt"))
    assert len(checked) == 2 and {p.stem for p in kept} == checked  # the first dream's M and iteration 1's
    assert all(weights_fingerprint(load_m(p, run.cfg)) == p.stem for p in kept)
    assert weights_fingerprint(load_m(run_dir / "m.pt", run.cfg)) in checked
    assert [r["stage"] for r in first["metrics"]["pipeline"]] == list(STAGES)
    report = json.loads((run_dir / "eval.json").read_text())
    a, r = report["agent"], report["random"]
    assert a["episodes"] == r["episodes"] == 2  # eval.episodes
    assert [e["seed"] for e in a["episodes_detail"]] == [e["seed"] for e in r["episodes_detail"]]
    assert _score_lines(log) == [
        f"real takecover: agent {a['mean']:.1f} ± {a['std']:.1f} (min {a['min']:.0f}, max {a['max']:.0f}) "
        "over 2 episodes",
        f"real takecover: random policy {r['mean']:.1f} ± {r['std']:.1f} on the same seeds",
    ]


def test_rerun_skips_every_stage_and_prints_the_same_scores(first):
    run_dir = first["dir"]
    log = first["root"] / "second.log"
    result, seconds = _pipeline(run_dir, log)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert _snapshot(run_dir) == first["snapshot"]
    metrics = _metrics(run_dir)
    for stage in ("vae", "m", "dream"):  # no epoch, no generation added
        assert metrics[stage] == first["metrics"][stage], stage
    assert [r["stage"] for r in metrics["pipeline"][len(STAGES):]] == list(STAGES[:-1])  # evaluate kept
    assert "kept" in text and _score_lines(text) == _score_lines(first["log"])
    assert seconds < 0.5 * first["seconds"], (seconds, first["seconds"])


# ----------------------------------------------------------------- when eval.json is kept

def _report(seed: int, episodes: int, env: str = "takecover") -> dict:
    block = {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0, "episodes": episodes, "episodes_detail": []}
    return {"env": env, "seeds": [seed, seed + episodes - 1], "agent": block, "random": block}


@pytest.mark.parametrize("report, kept", [
    (_report(10_000, 2), True),
    (_report(10_000, 5), True),  # a longer evaluation of the same controller also answers
    (_report(10_000, 1), False),  # fewer episodes than eval.episodes (e.g. after --set eval.episodes=...)
    (_report(10_001, 2), False),  # other seeds
    (_report(10_000, 2, env="carracing"), False),
    ("{not json", False),
], ids=["same", "more-episodes", "fewer-episodes", "other-seeds", "other-env", "corrupt"])
def test_eval_report_is_kept_only_when_it_covers_the_config(make_run, report, kept):
    run = make_run(overrides=["eval.episodes=2", "eval.seed=10000"])
    run.controller_path.write_bytes(b"controller")
    if isinstance(report, str):
        run.path("eval.json").write_text(report)
    else:
        write_json(run.path("eval.json"), report)
    stamp = run.controller_path.stat().st_mtime_ns
    os.utime(run.path("eval.json"), ns=(stamp + 10**9, stamp + 10**9))
    assert (_current_report(run) is not None) is kept
    if kept:  # and never when the controller is newer than the report
        os.utime(run.controller_path, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
        assert _current_report(run) is None
