"""`python run.py collect`: rollouts of an exploration policy in the real env.

Each episode is written by its worker as one ``.npz`` (temporary name, then
rename), so a rerun skips finished episodes and a kill loses only the episodes
in flight.  A manifest summarises the episodes; it is rebuilt from the files
when it is behind.
"""

from __future__ import annotations

import atexit
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

import envs
from agents.policies import make_policy
from agents.workers import run_tasks
from worldmodel import config as config_lib
from worldmodel.config import CollectConfig, EnvConfig
from worldmodel.episodes import (
    episode_index,
    episode_path,
    list_episodes,
    load_episode,
    read_manifest,
    save_episode,
    write_manifest,
)
from worldmodel.errors import UserError
from worldmodel.runs import Run

MANIFEST_EVERY_S = 5.0


def episode_seed(base: int, index: int) -> int:
    """A seed per episode, independent of the others and of evaluation seeds."""
    return int(np.random.SeedSequence([base, index]).generate_state(1)[0])


@lru_cache(maxsize=2)
def _worker_env(name: str, frame_skip: int, max_steps: int):
    # One env per worker process, reused across episodes: starting ViZDoom costs ~0.1 s.
    env = envs.make(name, frame_skip=frame_skip, max_steps=max_steps)
    atexit.register(env.close)  # else ViZDoom's engine process outlives the worker
    return env


def run_episode(env, policy, seed: int, max_steps: int) -> dict[str, np.ndarray]:
    """One episode under ``policy``; arrays as in worldmodel/episodes.py."""
    obs, _ = env.reset(seed=seed)
    policy.reset(np.random.default_rng(seed))
    frames, actions, rewards, terminals = [], [], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = np.asarray(policy.act(obs), np.float32).reshape(env.action_space.shape)
        frames.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or len(frames) >= max_steps
        rewards.append(reward)
        terminals.append(terminated)
    done = np.zeros(len(frames), bool)
    done[-1] = True
    return {
        "obs": np.stack(frames).astype(np.uint8),
        "action": np.stack(actions).astype(np.float32),
        "reward": np.asarray(rewards, np.float32),
        "done": done,
        "terminated": np.asarray(terminals, bool),
    }


def collect_episode(task: dict) -> dict:
    """Worker entry point: play one episode and write its file."""
    env_cfg = EnvConfig(**task["env"])
    collect_cfg = CollectConfig(**task["collect"])
    env = _worker_env(env_cfg.name, env_cfg.frame_skip, env_cfg.max_steps)
    if "agent" in task:
        from agents.agent import Agent, NoisyAgentPolicy

        spec = task["agent"]
        agent = Agent.from_run(spec["run"], config_lib.from_dict(spec["config"]), spec["params"])
        policy = NoisyAgentPolicy(agent, spec["noise"], env.action_space)
    else:
        policy = make_policy(collect_cfg, env.action_space)
    start = time.perf_counter()
    episode = run_episode(env, policy, task["seed"], collect_cfg.max_steps)
    save_episode(task["path"], episode)
    return {
        "steps": int(len(episode["reward"])),
        "return": float(episode["reward"].sum()),
        "terminated": bool(episode["terminated"][-1]),
        "seed": task["seed"],
        "seconds": time.perf_counter() - start,
    }


def _summary(path: Path) -> dict:
    data = load_episode(path, keys=("reward", "terminated"))
    return {"steps": int(len(data["reward"])), "return": float(data["reward"].sum()),
            "terminated": bool(data["terminated"][-1])}


def manifest_returns(entries: dict, folder: Path, indices: range) -> list[float]:
    """The returns the manifest's ``entries`` record for episodes ``indices`` (those it has)."""
    return [entries[p.name]["return"] for i in indices if (p := episode_path(folder, i)).name in entries]


def sync_manifest(folder: Path) -> dict:
    """The manifest, with entries for files it missed and none for files that are gone."""
    manifest = read_manifest(folder)
    entries = manifest.setdefault("episodes", {})
    present = {p.name: p for p in list_episodes(folder)}
    for name in list(entries):
        if name not in present:
            del entries[name]
    for name, path in present.items():
        if name not in entries:
            entries[name] = _summary(path)
    return manifest


def collect(run: Run, workers: int | None = None, backend: str | None = None,
            progress: bool = True) -> dict:
    """Collect ``collect.episodes`` episodes into ``run.episodes_dir``; resume if some exist."""
    return _collect(run, range(run.cfg.collect.episodes), {}, workers, backend, progress,
                    f"collect {run.cfg.env.name}")


def collect_agent(run: Run, indices: range, params: np.ndarray, noise: float, workers: int | None = None,
                  backend: str | None = None, progress: bool = True) -> dict:
    """Episodes ``indices`` played by the run's agent (V, M, controller ``params``) plus action noise.

    Used by ``iterate``; the episodes join the run's others and resume like them.
    """
    agent = {"run": str(run.dir), "config": config_lib.to_dict(run.cfg),
             "params": np.asarray(params, np.float32), "noise": float(noise)}
    return _collect(run, indices, {"agent": agent}, workers, backend, progress, "collect (agent)")


def _collect(run: Run, indices: range, extra: dict, workers: int | None, backend: str | None,
             progress: bool, desc: str) -> dict:
    cfg = run.cfg
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    folder = run.episodes_dir
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".ep_*.tmp"):  # in flight when an earlier collect was killed
        stale.unlink(missing_ok=True)
    manifest = sync_manifest(folder)
    done_names = set(manifest["episodes"])
    todo = [i for i in indices if episode_path(folder, i).name not in done_names]
    tasks = [
        {"name": f"episode {i}", "index": i, "seed": episode_seed(cfg.collect.seed, i),
         "path": str(episode_path(folder, i)), "env": vars(cfg.env), "collect": vars(cfg.collect), **extra}
        for i in todo
    ]
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="ep", desc=desc,
               disable=not progress)
    steps, start, last_write = 0, time.perf_counter(), time.perf_counter()
    new_returns = []
    try:
        for task, result in run_tasks(collect_episode, tasks, workers or cfg.collect.workers,
                                      backend or cfg.system.backend, cfg.system.task_timeout,
                                      ray_address=cfg.system.ray_address):
            manifest["episodes"][Path(task["path"]).name] = result
            steps += result["steps"]
            new_returns.append(result["return"])
            bar.update(1)
            bar.set_postfix(steps_per_s=f"{steps / (time.perf_counter() - start):.0f}",
                            mean_return=f"{np.mean(new_returns):.1f}")
            if time.perf_counter() - last_write > MANIFEST_EVERY_S:
                write_manifest(folder, manifest)
                last_write = time.perf_counter()
    finally:
        bar.close()
        if manifest != read_manifest(folder):  # a rerun with nothing to do changes no file
            write_manifest(folder, manifest)
    elapsed = time.perf_counter() - start
    entries = manifest["episodes"]
    returns = manifest_returns(entries, folder, indices)
    return {
        "episodes": len(entries),
        "new_episodes": len(tasks),
        "steps": int(sum(e["steps"] for e in entries.values())),
        "new_steps": steps,
        "steps_per_s": steps / elapsed if tasks else 0.0,
        "mean_return": float(np.mean(returns)) if returns else 0.0,
        "folder": str(folder),
    }


def episode_files(run: Run) -> list[Path]:
    """The run's episodes in index order; an error when there are none."""
    files = list_episodes(run.episodes_dir)
    if not files:
        raise UserError(f"{run.episodes_dir}: no collected episodes; run `python run.py collect` first")
    return sorted(files, key=episode_index)
