"""The Ray backend of run_tasks, and collect on it (skipped unless Ray is installed: `pip install -e '.[ray]'`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SMOKE

from agents.workers import WorkerError, run_tasks
from worldmodel.episodes import list_episodes, load_episode, read_manifest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray instance for this module; shut down whatever happens."""
    if ray.is_initialized():
        ray.shutdown()
    # Ray's workers import task functions by module name: let them find this file's.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}})
    try:
        yield
    finally:
        ray.shutdown()


# Task functions: module level, so that both backends' workers can import them by name.

def draws(task: dict) -> list[float]:
    return np.random.default_rng(task["seed"]).normal(size=3).tolist()


def flaky(task: dict) -> int:
    """Fails the first ``task["fail"]`` attempts (counted in a file), then returns the attempt number."""
    log = Path(task["log"])
    with open(log, "a") as f:
        f.write("x")
    attempt = len(log.read_text())
    if attempt <= task["fail"]:
        raise RuntimeError(f"flaky failure {attempt}")
    return attempt


def die(task: dict) -> None:
    os._exit(3)  # the worker process vanishes, as when killed


def hang(task: dict) -> None:
    time.sleep(600)


def test_ray_gives_the_same_results_as_local(cluster):
    tasks = [{"name": f"t{i}", "seed": i} for i in range(6)]
    local = {t["name"]: r for t, r in run_tasks(draws, tasks, workers=2, backend="local", timeout=120)}
    on_ray = {t["name"]: r for t, r in run_tasks(draws, tasks, workers=2, backend="ray", timeout=120)}
    assert on_ray == local and len(local) == 6
    assert local["t0"] != local["t1"]


def test_failing_task_is_retried_then_reported(cluster, tmp_path, capsys):
    tasks = [{"name": "doomed", "log": str(tmp_path / "doomed"), "fail": 99}]
    with pytest.raises(WorkerError, match="doomed failed after 2 attempts: RuntimeError: flaky failure 2"):
        list(run_tasks(flaky, tasks, workers=2, backend="ray", retries=1, timeout=120))
    assert (tmp_path / "doomed").read_text() == "xx"
    err = capsys.readouterr().err
    assert "retrying doomed" in err and "Traceback" in err


def test_task_that_fails_once_succeeds_on_retry(cluster, tmp_path):
    tasks = [{"name": f"t{i}", "log": str(tmp_path / f"t{i}"), "fail": i % 2} for i in range(4)]
    results = {t["name"]: r for t, r in run_tasks(flaky, tasks, workers=2, backend="ray", retries=1, timeout=120)}
    assert results == {"t0": 1, "t1": 2, "t2": 1, "t3": 2}


def test_dead_worker_and_hung_task_fail_loudly(cluster):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="Ray task dies failed"):
        list(run_tasks(die, [{"name": "dies"}], workers=2, backend="ray", retries=1, timeout=120))
    with pytest.raises(WorkerError, match="within 2 s"):
        list(run_tasks(hang, [{"name": "stuck"}], workers=2, backend="ray", timeout=2.0))
    assert time.monotonic() - start < 60
    # The hung task was cancelled: the cluster's CPUs are free again for the next run.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_collect_on_ray_writes_valid_episodes(tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:  # not a pipe: game processes may outlive the command
        result = subprocess.run([sys.executable, "run.py", "collect", "--config", str(SMOKE), "--run", str(run_dir),
                                 "--backend", "ray", "--workers", "2", "--quiet"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    files = list_episodes(run_dir / "episodes")
    assert [f.name for f in files] == [f"ep_{i:06d}.npz" for i in range(4)]  # collect.episodes
    for path in files:
        ep = load_episode(path)
        steps = len(ep["obs"])
        assert 0 < steps <= 60 and ep["obs"].shape[1:] == (64, 64, 3) and ep["obs"].dtype == np.uint8
        assert ep["action"].shape == (steps, 1) and len(ep["reward"]) == len(ep["done"]) == steps
        assert ep["done"][-1] and not ep["done"][:-1].any()
    assert sorted(read_manifest(run_dir / "episodes")["episodes"]) == [f.name for f in files]
