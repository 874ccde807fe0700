"""`python run.py collect`: rollouts of an exploration policy in the real env.

Each episode is written by its worker as one ``.npz`` (temporary name, then
rename), so a rerun skips finished episodes and a kill loses only the episodes
in flight.  A manifest summarises the episodes; it is rebuilt from the files
when it is behind.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

import envs
from agents.policies import make_policy
from agents.workers import default_workers, run_tasks
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
#: real environments one worker steps in lockstep when the agent collects (``iterate``), so V and
#: M run batched over them (benchmarks/collect_agent.py); a task is a few rounds of them.
AGENT_ENVS = 16
AGENT_EPISODES_PER_TASK = 3 * AGENT_ENVS


def episode_seed(base: int, index: int) -> int:
    """A seed per episode, independent of the others and of evaluation seeds."""
    return int(np.random.SeedSequence([base, index]).generate_state(1)[0])


@lru_cache(maxsize=2 * AGENT_ENVS)
def _worker_env(name: str, frame_skip: int, max_steps: int, slot: int = 0):
    # Envs per worker process (one per lockstep slot), reused across episodes and tasks:
    # starting ViZDoom costs ~0.1 s.
    env = envs.make(name, frame_skip=frame_skip, max_steps=max_steps)
    atexit.register(env.close)  # else ViZDoom's engine process outlives the worker
    return env


class _Recorder:
    """One episode's arrays as they are played; :meth:`arrays` as in worldmodel/episodes.py."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.frames: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.terminals: list[bool] = []

    def step(self, env, obs: np.ndarray, action: np.ndarray, max_steps: int) -> tuple[np.ndarray, bool]:
        """Play ``action`` from ``obs``; the next observation and whether the episode is over."""
        self.frames.append(obs)
        self.actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        self.rewards.append(reward)
        self.terminals.append(terminated)
        return obs, terminated or truncated or len(self.frames) >= max_steps

    def arrays(self) -> dict[str, np.ndarray]:
        done = np.zeros(len(self.frames), bool)
        done[-1] = True
        return {
            "obs": np.stack(self.frames).astype(np.uint8),
            "action": np.stack(self.actions).astype(np.float32),
            "reward": np.asarray(self.rewards, np.float32),
            "done": done,
            "terminated": np.asarray(self.terminals, bool),
        }


def run_episode(env, policy, seed: int, max_steps: int) -> dict[str, np.ndarray]:
    """One episode under ``policy``; arrays as in worldmodel/episodes.py."""
    obs, _ = env.reset(seed=seed)
    policy.reset(np.random.default_rng(seed))
    episode, over = _Recorder(), False
    while not over:
        action = np.asarray(policy.act(obs), np.float32).reshape(env.action_space.shape)
        obs, over = episode.step(env, obs, action, max_steps)
    return episode.arrays()


def run_agent_episodes(games: list, agent, noise: float, seeds: list[int],
                       max_steps: int) -> Iterator[tuple[int, dict[str, np.ndarray], float]]:
    """The agent's episodes with ``seeds``, its actions plus N(0, ``noise``²) noise (clipped to the
    action box), ``len(games)`` at a time in lockstep: V and M run batched over them, and a game
    whose episode ends starts the next one.  Yields ``(k, arrays, seconds)`` for ``seeds[k]`` as
    each ends (seconds: its wall time, shared with the episodes beside it).

    The agent's draws and the noise of an episode come from its seed alone, as when it is played
    by itself (``games`` of one): only the batch's rounding may differ.
    """
    low, high = games[0].action_space.low, games[0].action_space.high
    todo = list(reversed(range(len(seeds))))
    agent.reset(0, [])
    running: list[dict] = []

    def start(game) -> None:
        k = todo.pop()
        rng = np.random.default_rng(seeds[k])
        obs, _ = game.reset(seed=seeds[k])
        agent.add([int(rng.integers(2**31))])
        running.append({"k": k, "game": game, "rng": rng, "obs": obs, "episode": _Recorder()})

    for game in games[:len(seeds)]:
        start(game)
    while running:
        actions = agent.act(np.stack([r["obs"] for r in running]))
        over = []
        for r, action in zip(running, actions):
            action = np.clip(action + noise * r["rng"].standard_normal(action.shape), low, high).astype(np.float32)
            r["obs"], ended = r["episode"].step(r["game"], r["obs"], action, max_steps)
            over.append(ended)
        if any(over):
            agent.keep([row for row, ended in enumerate(over) if not ended])
            finished = [r for r, ended in zip(running, over) if ended]
            running[:] = [r for r, ended in zip(running, over) if not ended]
            for r in finished:
                yield r["k"], r["episode"].arrays(), time.perf_counter() - r["episode"].started
                if todo:
                    start(r["game"])


def _saved(path: str, episode: dict[str, np.ndarray], seed: int, seconds: float) -> dict:
    """Write ``episode`` to ``path``; its manifest entry."""
    save_episode(path, episode)
    return {
        "steps": int(len(episode["reward"])),
        "return": float(episode["reward"].sum()),
        "terminated": bool(episode["terminated"][-1]),
        "seed": seed,
        "seconds": seconds,
    }


def collect_episode(task: dict) -> list[dict]:
    """Worker entry point: play the exploration policy's episode and write its file."""
    env_cfg = EnvConfig(**task["env"])
    collect_cfg = CollectConfig(**task["collect"])
    env = _worker_env(env_cfg.name, env_cfg.frame_skip, env_cfg.max_steps)
    policy = make_policy(collect_cfg, env.action_space)
    (wanted,) = task["episodes"]
    start = time.perf_counter()
    episode = run_episode(env, policy, wanted["seed"], collect_cfg.max_steps)
    return [_saved(wanted["path"], episode, wanted["seed"], time.perf_counter() - start)]


def collect_agent_episodes(task: dict) -> list[dict]:
    """Worker entry point: the agent plays the task's episodes, ``AGENT_ENVS`` at a time in
    lockstep (:func:`run_agent_episodes`), and writes each file as its episode ends."""
    from agents.agent import Agent

    env_cfg = EnvConfig(**task["env"])
    spec = task["agent"]
    agent = Agent.from_run(spec["run"], config_lib.from_dict(spec["config"]), spec["params"])
    seeds = [e["seed"] for e in task["episodes"]]
    games = [_worker_env(env_cfg.name, env_cfg.frame_skip, env_cfg.max_steps, slot)
             for slot in range(min(AGENT_ENVS, len(seeds)))]
    return [_saved(task["episodes"][k]["path"], episode, seeds[k], seconds)
            for k, episode, seconds in run_agent_episodes(games, agent, spec["noise"], seeds,
                                                          task["collect"]["max_steps"])]


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
    return _collect(run, range(run.cfg.collect.episodes), None, workers, backend, progress,
                    f"collect {run.cfg.env.name}")


def collect_agent(run: Run, indices: range, params: np.ndarray, noise: float, workers: int | None = None,
                  backend: str | None = None, progress: bool = True) -> dict:
    """Episodes ``indices`` played by the run's agent (V, M, controller ``params``) plus action noise.

    Used by ``iterate``; the episodes join the run's others and resume like them.  Each worker
    plays ``AGENT_ENVS`` of them at a time in lockstep (:func:`run_agent_episodes`).
    """
    agent = {"run": str(run.dir), "config": config_lib.to_dict(run.cfg),
             "params": np.asarray(params, np.float32), "noise": float(noise)}
    return _collect(run, indices, agent, workers, backend, progress, "collect (agent)")


def _tasks(cfg, todo: list[dict], agent: dict | None, workers: int) -> list[dict]:
    """The worker tasks for episodes ``todo``: one each for the exploration policy; for the agent,
    shares of up to ``AGENT_EPISODES_PER_TASK`` in a multiple of ``workers`` tasks, so that the
    workers finish together."""
    base = {"env": vars(cfg.env), "collect": vars(cfg.collect)}
    if agent is None:
        return [{"name": f"episode {e['index']}", "episodes": [e], **base} for e in todo]
    if not todo:
        return []
    rounds = -(-len(todo) // (workers * AGENT_EPISODES_PER_TASK))
    per_task = -(-len(todo) // (rounds * workers))
    return [{"name": f"episodes {share[0]['index']}..{share[-1]['index']}", "episodes": share, "agent": agent, **base}
            for share in (todo[i:i + per_task] for i in range(0, len(todo), per_task))]


def _collect(run: Run, indices: range, agent: dict | None, workers: int | None, backend: str | None,
             progress: bool, desc: str) -> dict:
    cfg = run.cfg
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    workers = workers or cfg.collect.workers or default_workers()
    folder = run.episodes_dir
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".ep_*.tmp"):  # in flight when an earlier collect was killed
        stale.unlink(missing_ok=True)
    manifest = sync_manifest(folder)
    done_names = set(manifest["episodes"])
    todo = [{"index": i, "seed": episode_seed(cfg.collect.seed, i), "path": str(episode_path(folder, i))}
            for i in indices if episode_path(folder, i).name not in done_names]
    tasks = _tasks(cfg, todo, agent, workers)
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="ep", desc=desc,
               disable=not progress)
    steps, start, last_write = 0, time.perf_counter(), time.perf_counter()
    new_returns = []
    try:
        for task, results in run_tasks(collect_episode if agent is None else collect_agent_episodes, tasks,
                                       workers, backend or cfg.system.backend, cfg.system.task_timeout,
                                       ray_address=cfg.system.ray_address):
            for episode, result in zip(task["episodes"], results):
                manifest["episodes"][Path(episode["path"]).name] = result
                steps += result["steps"]
                new_returns.append(result["return"])
            bar.update(len(results))
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
        "new_episodes": len(todo),
        "steps": int(sum(e["steps"] for e in entries.values())),
        "new_steps": steps,
        "steps_per_s": steps / elapsed if todo else 0.0,
        "mean_return": float(np.mean(returns)) if returns else 0.0,
        "folder": str(folder),
    }


def episode_files(run: Run) -> list[Path]:
    """The run's episodes in index order; an error when there are none."""
    files = list_episodes(run.episodes_dir)
    if not files:
        raise UserError(f"{run.episodes_dir}: no collected episodes; run `python run.py collect` first")
    return sorted(files, key=episode_index)
