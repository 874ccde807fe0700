"""Collect: our `collect` against a plain single-process gymnasium loop.

For each env, in this process: a plain loop (``envs.make``, the same policy and
seeds, ``np.savez_compressed`` of every episode, as a hand-written data script
would do) and our :func:`agents.collect.collect` with its default settings (one
worker per core, held_random for TakeCover, road for CarRacing).  Rounds
alternate between the two so that load from other processes hits both alike.

Two figures for ours:

- total: every step over the whole call's wall time, which includes what a user
  pays: starting the workers, starting the engines, writing the files and the
  manifest, stopping the workers.
- steady: steps of the episodes that finish after the first round of episodes
  (one per worker) over the time from the end of that round to the last episode
  (episode-file modification times): the throughput once the workers are warm.

    python benchmarks/collect.py [--envs takecover carracing] [--rounds 3]
        [--episodes N] [--max-steps N] [--workers N]

Results: docs/benchmarks.md, "Collect".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import envs
from agents.collect import collect, episode_seed
from agents.policies import make_policy
from agents.workers import default_workers
from worldmodel import config as config_lib
from worldmodel.config import Config
from worldmodel.episodes import list_episodes, read_manifest
from worldmodel.runs import open_run

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"takecover": "configs/takecover-cpu.yaml", "carracing": "configs/carracing-cpu.yaml"}
SIZES = {"takecover": (32, 500), "carracing": (8, 200)}  # episodes, step cap: ~10 s of the plain loop each


def bench_config(env: str, episodes: int, max_steps: int) -> Config:
    cfg = config_lib.load(ROOT / PRESETS[env])
    return config_lib.apply_overrides(cfg, [f"collect.episodes={episodes}", f"collect.max_steps={max_steps}",
                                            f"env.max_steps={max_steps}"])


def _spin(n: int) -> float:
    start, x = time.perf_counter(), 0
    for i in range(n):
        x += i
    return time.perf_counter() - start


def parallel_capacity(processes: int, n: int = 3_000_000) -> float:
    """How many times more CPU-bound work ``processes`` processes get done than one, right now.

    The ceiling for any parallel collect at that moment: on a shared machine other
    jobs' load can bring it down to 1.
    """
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_spin, [1] * processes)  # started and warm
        one = pool.apply(_spin, (n,))
        start = time.perf_counter()
        pool.map(_spin, [n] * processes, chunksize=1)
        return processes * one / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished descendants (workers, game engines)."""
    own, done = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime


def plain_loop(cfg: Config, out: Path) -> dict:
    """The hand-written version: one process, one env, the same policy and seeds, one .npz per episode."""
    start, cpu = time.perf_counter(), cpu_seconds()
    env = envs.make(cfg.env.name, frame_skip=cfg.env.frame_skip, max_steps=cfg.env.max_steps)
    policy = make_policy(cfg.collect, env.action_space)
    steps, save_s = 0, 0.0
    for i in range(cfg.collect.episodes):
        seed = episode_seed(cfg.collect.seed, i)
        obs, _ = env.reset(seed=seed)
        policy.reset(np.random.default_rng(seed))
        frames, actions, rewards, dones = [], [], [], []
        done = False
        while not done:
            action = policy.act(obs)
            frames.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated or len(frames) >= cfg.collect.max_steps
            rewards.append(reward)
            dones.append(done)
        steps += len(frames)
        t = time.perf_counter()
        np.savez_compressed(out / f"ep_{i:06d}.npz", obs=np.stack(frames), action=np.stack(actions),
                            reward=np.asarray(rewards, np.float32), done=np.asarray(dones))
        save_s += time.perf_counter() - t
    env.close()
    wall = time.perf_counter() - start
    return {"steps": steps, "wall": wall, "steps_per_s": steps / wall, "env_steps_per_s": steps / (wall - save_s),
            "cpu_ms_per_step": 1000 * (cpu_seconds() - cpu) / steps}


def ours(cfg: Config, out: Path, workers: int | None) -> dict:
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(config_lib.dump(cfg))
    run = open_run(out, None)
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = collect(run, workers=workers, progress=False)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    n_workers = workers or cfg.collect.workers or default_workers()
    return {"steps": summary["new_steps"], "wall": wall, "steps_per_s": summary["new_steps"] / wall,
            "steady_steps_per_s": _steady(run.episodes_dir, n_workers),
            "cpu_ms_per_step": 1000 * cpu / summary["new_steps"]}


def _steady(folder: Path, workers: int) -> float:
    """Steps per second after the first round of episodes, from the episode files' mtimes."""
    entries = read_manifest(folder)["episodes"]
    finished = sorted((p.stat().st_mtime, entries[p.name]["steps"]) for p in list_episodes(folder))
    if len(finished) <= workers:
        return float("nan")
    later = finished[workers:]
    return sum(s for _, s in later) / (later[-1][0] - finished[workers - 1][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["takecover", "carracing"], choices=sorted(PRESETS))
    parser.add_argument("--episodes", type=int, help="episodes per env (default: takecover 32, carracing 8)")
    parser.add_argument("--max-steps", type=int, help="step cap per episode (default: takecover 500, carracing 200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="ours: worker processes (default: one per core)")
    args = parser.parse_args()

    cores = default_workers()
    print(f"machine: {platform.machine()}, {cores} cores usable, python {platform.python_version()}")
    for env in args.envs:
        cfg = bench_config(env, args.episodes or SIZES[env][0], args.max_steps or SIZES[env][1])
        plain, mine, capacity = [], [], []
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                plain.append(plain_loop(cfg, Path(tmp)))
                mine.append(ours(cfg, Path(tmp) / "run", args.workers))
            load = os.getloadavg()[0]
            capacity.append(parallel_capacity(cores))
            print(f"{env} round {r + 1}: parallel capacity {capacity[-1]:.2f}x; plain {plain[-1]['steps_per_s']:.0f} steps/s "
                  f"({plain[-1]['steps']} steps, {plain[-1]['wall']:.1f} s; env alone "
                  f"{plain[-1]['env_steps_per_s']:.0f}), ours total {mine[-1]['steps_per_s']:.0f} steps/s "
                  f"({mine[-1]['wall']:.1f} s), steady {mine[-1]['steady_steps_per_s']:.0f} steps/s; "
                  f"CPU ms/step plain {plain[-1]['cpu_ms_per_step']:.2f}, ours {mine[-1]['cpu_ms_per_step']:.2f}; "
                  f"load {load:.1f}")
        p = statistics.median(x["steps_per_s"] for x in plain)
        t = statistics.median(x["steps_per_s"] for x in mine)
        s = statistics.median(x["steady_steps_per_s"] for x in mine)
        print(f"{env}: {cfg.collect.episodes} episodes x <= {cfg.collect.max_steps} steps, policy "
              f"{cfg.collect.policy}, workers {args.workers or cfg.collect.workers or cores}: plain {p:.0f} steps/s, "
              f"ours total {t:.0f} steps/s ({t / p:.2f}x), ours steady {s:.0f} steps/s ({s / p:.2f}x); "
              f"parallel capacity {statistics.median(capacity):.2f}x")


if __name__ == "__main__":
    main()
