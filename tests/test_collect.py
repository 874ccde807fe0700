"""collect: episode files, manifest, rerun and resume after a kill; worker retries and timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SMOKE
from gymnasium import spaces

import envs
from agents.collect import collect, episode_seed
from agents.workers import WorkerError, run_tasks
from worldmodel.episodes import KEYS, list_episodes, load_episode, read_manifest

STEPS = 40
CARRACING_ACTIONS = spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
KILL_EPISODES = 16


# ----------------------------------------------------------------- worker entry points (importable)

def flaky(task: dict) -> int:
    """Fails on the first ``task["fail"]`` calls (counted in a file), then returns the call number."""
    with open(task["log"], "a") as f:
        f.write("x")
    calls = len(Path(task["log"]).read_text())
    if calls <= task["fail"]:
        raise RuntimeError(f"flaky failure {calls}")
    return calls


def hang(task: dict) -> None:
    time.sleep(300)


# ----------------------------------------------------------------- the files

@pytest.fixture(scope="module", params=envs.REAL_ENVS)
def collected(request, tmp_path_factory):
    """(run, summary) of 2 episodes of ``STEPS`` steps collected by 2 worker processes."""
    from worldmodel.runs import open_run

    name = request.param
    policy = "road" if name == "carracing" else "held_random"
    run = open_run(tmp_path_factory.mktemp(name) / "run", SMOKE, [
        f"env.name={name}", f"collect.policy={policy}", "collect.episodes=2",
        f"collect.max_steps={STEPS}", f"env.max_steps={STEPS}",
    ])
    return run, collect(run, workers=2, progress=False)


def test_episode_files(collected):
    run, summary = collected
    files = list_episodes(run.episodes_dir)
    assert [f.name for f in files] == ["ep_000000.npz", "ep_000001.npz"]
    assert summary["episodes"] == summary["new_episodes"] == 2
    a = envs.action_dim(run.cfg.env.name)
    for path in files:
        ep = load_episode(path)
        with np.load(path) as raw:
            assert sorted(raw.files) == sorted(KEYS)
        t = len(ep["reward"])
        assert t == STEPS  # neither game ends itself this early under these policies
        assert ep["obs"].shape == (t, 64, 64, 3) and ep["obs"].dtype == np.uint8
        assert ep["action"].shape == (t, a) and ep["action"].dtype == np.float32
        assert ep["reward"].shape == (t,) and ep["reward"].dtype == np.float32
        assert ep["done"].dtype == np.bool_ and ep["terminated"].dtype == np.bool_
        assert ep["done"][-1] and not ep["done"][:-1].any()
        assert not ep["terminated"].any()  # ended by the step cap
        assert np.all(np.abs(ep["action"]) <= 1.0)


def test_manifest_matches_files(collected):
    run, summary = collected
    entries = read_manifest(run.episodes_dir)["episodes"]
    assert sorted(entries) == ["ep_000000.npz", "ep_000001.npz"]
    for name, entry in entries.items():
        ep = load_episode(run.episodes_dir / name)
        assert entry["steps"] == len(ep["reward"])
        assert entry["return"] == pytest.approx(float(ep["reward"].sum()), abs=1e-3)
        assert entry["terminated"] is False
    assert summary["steps"] == 2 * STEPS


def test_steps_align_with_the_env(collected):
    """Replaying the file's actions from its seed gives its frames and rewards: step t is
    (frame before the action, the action, the reward after it)."""
    run, _ = collected
    ep = load_episode(run.episodes_dir / "ep_000001.npz")
    env = envs.make(run.cfg.env.name, max_steps=STEPS)
    try:
        obs, _ = env.reset(seed=episode_seed(run.cfg.collect.seed, 1))
        for t in range(len(ep["reward"])):
            np.testing.assert_array_equal(obs, ep["obs"][t], err_msg=f"frame {t}")
            obs, reward, *_ = env.step(ep["action"][t])
            assert reward == pytest.approx(ep["reward"][t], abs=1e-5), f"reward {t}"
    finally:
        env.close()


def test_rerun_skips_finished_episodes(collected):
    run, _ = collected
    before = {p.name: p.stat().st_mtime_ns for p in list_episodes(run.episodes_dir)}
    summary = collect(run, workers=2, progress=False)
    assert summary["new_episodes"] == 0 and summary["new_steps"] == 0
    assert summary["episodes"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in list_episodes(run.episodes_dir)} == before


def test_shared_smoke_run(smoke_run):
    files = list_episodes(smoke_run.episodes_dir)
    assert len(files) == 2
    assert all(len(load_episode(f)["reward"]) == 40 for f in files)


# ----------------------------------------------------------------- kill and resume

def _processes_below(pid: int) -> list[int]:
    from agents.workers import _descendants

    return list(_descendants({pid}))


def test_resume_after_kill(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", "collect", "--config", str(SMOKE), "--run", str(run_dir), "--quiet",
           "--set", f"collect.episodes={KILL_EPISODES}", "--set", "collect.max_steps=120", "--set", "env.max_steps=120"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    episodes = run_dir / "episodes"
    try:
        deadline = time.monotonic() + 60
        while not list_episodes(episodes):
            assert proc.poll() is None, f"collect ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no episode within 60 s"
            time.sleep(0.05)
        below = _processes_below(proc.pid)  # workers and their game engines
        assert below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    # Orphaned workers notice within a second or so and exit, closing their engines.
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{pid}") for pid in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in below if os.path.exists(f"/proc/{pid}")], "workers outlived their parent"

    done_before = list_episodes(episodes)
    assert 1 <= len(done_before) < KILL_EPISODES, "the kill came too late to test a resume"
    for path in done_before:  # nothing with a final name is half-written
        assert len(load_episode(path)["reward"]) > 0

    mtimes = {p.name: p.stat().st_mtime_ns for p in done_before}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    files = list_episodes(episodes)
    assert [f.name for f in files] == [f"ep_{i:06d}.npz" for i in range(KILL_EPISODES)]
    for path in files:
        ep = load_episode(path)
        assert ep["done"][-1] and not ep["done"][:-1].any()
    assert {n: (episodes / n).stat().st_mtime_ns for n in mtimes} == mtimes  # finished ones kept
    assert not list(episodes.glob(".*.tmp")), "temporary files left behind"
    assert sorted(read_manifest(episodes)["episodes"]) == [f.name for f in files]
    assert f"new_episodes: {KILL_EPISODES - len(done_before)}" in result.stdout


# ----------------------------------------------------------------- workers

@pytest.mark.parametrize("workers", [1, 2])
def test_failing_task_is_retried_then_reported(tmp_path, capsys, workers):
    tasks = [{"name": "doomed", "log": str(tmp_path / "doomed"), "fail": 99}]
    with pytest.raises(WorkerError, match="doomed failed after 2 attempts: RuntimeError: flaky failure 2"):
        list(run_tasks(flaky, tasks, workers=workers, retries=1, timeout=60))
    assert (tmp_path / "doomed").read_text() == "xx"
    err = capsys.readouterr().err
    assert "retrying doomed" in err and "Traceback" in err  # the worker's traceback is shown


def test_task_that_fails_once_succeeds_on_retry(tmp_path):
    tasks = [{"name": f"t{i}", "log": str(tmp_path / f"t{i}"), "fail": i % 2} for i in range(4)]
    results = dict((t["name"], r) for t, r in run_tasks(flaky, tasks, workers=2, retries=1, timeout=60))
    assert results == {"t0": 1, "t1": 2, "t2": 1, "t3": 2}


@pytest.mark.parametrize("workers", [1, 2])
def test_hung_task_times_out(workers):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="within 1 s"):
        list(run_tasks(hang, [{"name": "stuck"}], workers=workers, timeout=1.0))
    assert time.monotonic() - start < 15


def test_road_policy_drives_the_car():
    """CarRacing's collection policy must cover the track: it earns tile rewards where uniform noise crawls."""
    import envs
    from agents.policies import RandomPolicy, RoadFollowingPolicy

    env = envs.make("carracing", max_steps=250)
    totals = {}
    for name, policy in (("road", RoadFollowingPolicy(env.action_space)), ("random", RandomPolicy(env.action_space))):
        obs, _ = env.reset(seed=3)
        policy.reset(np.random.default_rng(3))
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
            total, done = total + reward, terminated or truncated
        totals[name] = total
    env.close()
    assert totals["road"] > 50.0
    assert totals["road"] > totals["random"] + 40.0


def test_leaning_held_random_reaches_one_side_and_zero_lean_is_unchanged():
    """lean > 0 biases whole episodes to one side; lean = 0 draws exactly the old actions."""
    from agents.policies import HeldRandomPolicy

    space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def actions(policy, seed, steps=400):
        policy.reset(np.random.default_rng(seed))
        return np.concatenate([policy.act(None) for _ in range(steps)])

    plain = [actions(HeldRandomPolicy(space, 1, 10), s) for s in range(40)]
    leaning = [actions(HeldRandomPolicy(space, 1, 10, lean=1.0), s) for s in range(40)]
    assert np.array_equal(plain[0], actions(HeldRandomPolicy(space, 1, 10, lean=0.0), 0))
    assert all(np.all((a >= -1) & (a <= 1)) for a in leaning)

    def drift(a):  # share of "right" minus share of "left" presses (TakeCover's thirds)
        return abs(np.mean(a > 1 / 3) - np.mean(a < -1 / 3))

    assert max(drift(a) for a in plain) < 0.25
    assert np.mean([drift(a) > 0.5 for a in leaning]) > 0.25  # many leaning episodes mostly press one way


def test_pacer_runs_full_legs_left_then_right_and_ignores_the_screen():
    from agents.policies import PacingPolicy

    pacer = PacingPolicy(3)
    pacer.reset(np.random.default_rng(0))
    first = np.concatenate([pacer.act(np.full((64, 64, 3), i, np.uint8)) for i in range(8)])
    assert first.tolist() == [-1, -1, -1, 1, 1, 1, -1, -1]
    pacer.reset(np.random.default_rng(1))  # a new episode starts a new left leg
    assert np.concatenate([pacer.act(None) for _ in range(4)]).tolist() == [-1, -1, -1, 1]
    with pytest.raises(ValueError, match="steps 0"):
        PacingPolicy(0)


def test_road_policy_gas_level_varies_by_episode_not_by_frame():
    """Each episode drives at its own gas level, drawn from its seed; the frame never moves the gas."""
    from agents.policies import RoadFollowingPolicy

    space = CARRACING_ACTIONS
    frames = np.random.default_rng(0).integers(0, 256, (300, 64, 64, 3), dtype=np.uint8)

    def gas(seed, frames):
        policy = RoadFollowingPolicy(space)
        policy.reset(np.random.default_rng(seed))
        return np.array([policy.act(f)[1] for f in frames])

    levels = [gas(s, frames)[100:].mean() for s in range(12)]
    assert max(levels) - min(levels) > 0.3  # slow and fast episodes
    assert np.array_equal(gas(5, frames), gas(5, frames[::-1]))  # same seed, other frames: same gas


def test_road_policy_wanders_over_the_whole_action_box():
    """Wandering reaches full brake and full steering, which road following alone never does."""
    from agents.policies import RoadFollowingPolicy

    space = CARRACING_ACTIONS
    frames = np.random.default_rng(0).integers(0, 256, (400, 64, 64, 3), dtype=np.uint8)

    def actions(wander_max):
        out = []
        for seed in range(6):
            policy = RoadFollowingPolicy(space, wander_max=wander_max)
            policy.reset(np.random.default_rng(seed))
            out += [policy.act(f) for f in frames]
        return np.array(out)

    calm, wild = actions(0.0), actions(0.05)
    assert calm[:, 2].max() <= 0.6  # only the fixed brake pulses
    assert wild[:, 2].max() > 0.95 and abs(wild[:, 0]).max() > 0.99
    assert np.all((wild >= space.low) & (wild <= space.high))
