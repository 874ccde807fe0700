"""`python run.py evaluate`: the full agent in the real environment.

Episodes are split into tasks of a few seeds each; a worker steps its task's
environments in lockstep so V and M run batched over them.  The random policy
plays the same seeds for comparison, and in TakeCover with ``eval.pacer_steps`` a blind
pacer too (agents/policies.py); their episodes are kept from the run's last ``eval.json``
while env, frame skip, seeds and step limit stay the same, since they do not depend on the
agent.  Results go to ``<run>/eval.json``; an evaluation under other settings than the run's
(``--set``, another ``--episodes``) goes to ``<run>/evals/<what changed>.json`` instead, so a
screen on other seeds never replaces the run's own score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

import envs
from agents.agent import Agent, Committee, followers, load_agent
from agents.policies import PacingPolicy, RandomPolicy
from agents.workers import default_workers, run_tasks
from worldmodel import config as config_lib
from worldmodel.errors import UserError
from worldmodel.io import write_json
from worldmodel.runs import Run, unrecorded_changes

ENVS_PER_TASK = 8


def _agent(task: dict, cfg) -> Agent | Committee:
    """The task's agent: the run's (``load_agent``: a committee where select kept one), ``params``
    with ``m_path``, or a committee of ``task["committee"]`` = [(params, m_path or None), ...],
    the first one leading."""
    if not task.get("committee"):
        if task.get("params") is None and task.get("m_path") is None:
            return load_agent(task["run"], cfg)
        return Agent.from_run(task["run"], cfg, task.get("params"), m_path=task.get("m_path"))
    (params, m_path), *rest = task["committee"]
    return Committee([Agent.from_run(task["run"], cfg, params, m_path=m_path), *followers(task["run"], cfg, rest)])


def _video_path(task: dict, seed: int) -> Path | None:
    if seed not in task.get("video_seeds", ()):
        return None
    return Path(task["run"]) / "videos" / f"{task['policy']}_seed{seed}.mp4"


def play(task: dict) -> list[dict]:
    """Worker entry point: play ``task["seeds"]`` in lockstep; one result per episode."""
    cfg = config_lib.from_dict(task["config"])
    seeds = list(task["seeds"])
    games = [envs.make_from_config(cfg.env) for _ in seeds]
    frames = np.stack([env.reset(seed=s)[0] for env, s in zip(games, seeds)])
    videos = {i: [env.render()] for i, (env, s) in enumerate(zip(games, seeds)) if _video_path(task, s)}
    if task["policy"] == "agent":
        agent = _agent(task, cfg)
        agent.reset(len(seeds), seeds)
    else:  # a baseline: one policy per environment, its draws from the episode's seed
        baselines = [PacingPolicy(cfg.eval.pacer_steps) if task["policy"] == "pacing"
                     else RandomPolicy(games[0].action_space) for _ in seeds]
        for policy, s in zip(baselines, seeds):
            policy.reset(np.random.default_rng(s))
    alive = list(range(len(seeds)))
    returns, steps, shielded = np.zeros(len(seeds)), np.zeros(len(seeds), int), np.zeros(len(seeds), int)
    while alive:
        if task["policy"] == "agent":
            actions = agent.act(frames)
        else:
            actions = np.stack([baselines[i].act(None) for i in alive])
        keep, next_frames = [], []
        for row, i in enumerate(alive):
            obs, reward, terminated, truncated, _ = games[i].step(actions[row])
            returns[i] += reward
            steps[i] += 1
            if i in videos:
                videos[i].append(games[i].render())
            if not (terminated or truncated):
                keep.append(row)
                next_frames.append(obs)
        if task["policy"] == "agent":
            shielded[alive] = agent.overrides
            if len(keep) < len(alive):
                agent.keep(np.asarray(keep))
        alive = [alive[row] for row in keep]
        frames = np.stack(next_frames) if next_frames else frames[:0]
    for env in games:
        env.close()
    for i, frames_i in videos.items():
        _write_video(_video_path(task, seeds[i]), frames_i, cfg.env.name)
    shield = task["policy"] == "agent" and agent.critic is not None
    return [{"seed": s, "return": float(returns[i]), "steps": int(steps[i]),
             **({"shielded": int(shielded[i])} if shield else {})} for i, s in enumerate(seeds)]


def _write_video(path: Path, frames: list[np.ndarray], env_name: str) -> None:
    from agents.watch import write_video

    write_video(path, np.stack(frames), fps=35 if env_name == "takecover" else 50)


def _stats(returns: list[float]) -> dict:
    r = np.asarray(returns, float)
    return {"mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()), "max": float(r.max()),
            "episodes": int(r.size)}


def play_many(run: Run, policy: str, seeds: list[int], params: np.ndarray | None = None,
              workers: int | None = None, backend: str | None = None, video_seeds: tuple = (),
              progress: bool = False, desc: str = "evaluate", m_path: Path | None = None,
              committee: list[tuple[np.ndarray, Path | None]] | None = None) -> list[dict]:
    """Play ``seeds`` with the agent (``policy="agent"``) or a baseline ("random", "pacing"), in parallel.

    ``params``: the agent's controller (P,), or one per seed (len(seeds), P); None: the run's.
    ``m_path``: the agent's M, when not the run's m.pt.  ``committee``: [(params, m_path), ...]
    to play a :class:`Committee` of those agents instead (then ``params`` is ignored).  Results come in the order of ``seeds``
    (which may repeat: several controllers on one seed)."""
    cfg = run.cfg
    workers = workers or cfg.eval.workers or default_workers()
    per_task = max(1, min(ENVS_PER_TASK, -(-len(seeds) // workers)))
    params = None if params is None else np.asarray(params, np.float32)
    per_seed = params is not None and params.ndim == 2
    if per_seed and len(params) != len(seeds):
        raise ValueError(f"{len(params)} controllers for {len(seeds)} seeds")
    base = {"run": str(run.dir), "config": config_lib.to_dict(cfg), "policy": policy, "params": params,
            "video_seeds": tuple(video_seeds), "m_path": None if m_path is None else str(m_path),
            "committee": [(np.asarray(p, np.float32), None if m is None else str(m)) for p, m in committee or ()]}
    tasks = [{**base, "name": f"{policy} seeds {seeds[i]}..", "start": i, "seeds": seeds[i:i + per_task],
              **({"params": params[i:i + per_task]} if per_seed else {})}
             for i in range(0, len(seeds), per_task)]
    results: list[dict | None] = [None] * len(seeds)
    done: list[float] = []
    with tqdm(total=len(seeds), unit="ep", desc=desc, disable=not progress) as bar:
        for task, episode_results in run_tasks(play, tasks, workers, backend or cfg.system.backend,
                                               cfg.system.task_timeout, ray_address=cfg.system.ray_address):
            results[task["start"]:task["start"] + len(episode_results)] = episode_results
            done.extend(r["return"] for r in episode_results)
            bar.update(len(episode_results))
            bar.set_postfix(mean=f"{np.mean(done):.1f}")
    return results


def evaluate_params(run: Run, params: np.ndarray | None, episodes: int, seed: int,
                    workers: int | None = None, backend: str | None = None,
                    m_path: Path | None = None, committee: list | None = None) -> list[float]:
    """Real-environment returns of controller ``params`` (with M ``m_path``, default the run's
    m.pt), or of a ``committee`` [(params, m_path), ...], on seeds seed .. seed+episodes-1, in
    seed order."""
    seeds = list(range(seed, seed + episodes))
    return [r["return"] for r in play_many(run, "agent", seeds, params, workers, backend, m_path=m_path,
                                           committee=committee)]


def dream_score(run: Run, episodes: int, seed: int, policy: str | Callable[[int], float] = "agent",
                max_steps: int | None = None) -> dict:
    """The run's controller (``policy="agent"``), the blind pacer (``"pacing"``) or any blind
    policy (a callable: step t -> the action every dream takes at t) in M's dream: ``episodes``
    dreams as CMA-ES dreamt them (τ, done rule), at most ``max_steps`` steps (default
    ``cmaes.max_steps``).

    Each dream its own noise, drawn from ``seed``; its start z from the run's latents, so every
    policy scored with the same seed meets the same dreams.  Returns the statistics of
    :func:`_stats` (with ``temperature``).
    """
    result, temperature = dream_episodes(run, episodes, seed, policy, max_steps)
    return {**_stats(result.returns.tolist()), "temperature": temperature}


def dream_episodes(run: Run, episodes: int, seed: int, policy: str | Callable[[int], float] = "agent",
                   max_steps: int | None = None):
    """The dreams of :func:`dream_score` themselves: (``envs.dream.DreamResult`` with each dream's
    return, length and whether M ended it, the dream's temperature)."""
    import torch

    from agents.controller import ControllerSpec, load_controller
    from envs.dream import (
        DreamSettings,
        blind_policy,
        dream_rollouts,
        load_start_latents,
        load_world_model,
        sample_start_z,
    )

    m = load_world_model(run)
    settings = DreamSettings.from_config(run.cfg)
    if run.cfg.cmaes.done_calibration > 0:  # the threshold the search calibrated for this M, if any
        from agents.calibrate import dream_threshold
        from agents.cmaes import weights_fingerprint

        threshold = dream_threshold(run, weights_fingerprint(m))
        settings = settings if threshold is None else dataclasses.replace(settings, done_threshold=threshold)
    if max_steps is not None:
        settings = dataclasses.replace(settings, max_steps=max_steps)
    spec = ControllerSpec.for_config(run.cfg, m)
    blind = None
    if policy == "pacing":
        policy = PacingPolicy(run.cfg.eval.pacer_steps).action_at
    if callable(policy):
        params, blind = np.zeros((1, 0), np.float32), blind_policy(policy)
    else:
        params, _ = load_controller(run.controller_path, spec=spec)
    generator = torch.Generator().manual_seed(seed)
    z0 = sample_start_z(load_start_latents(run), episodes, generator)
    with torch.no_grad():
        result = dream_rollouts(m, torch.as_tensor(params).reshape(1, -1).expand(episodes, -1), spec, z0,
                                settings, generator, policy=blind)
    return result, settings.temperature


def report_path(run: Run, episodes: int) -> Path:
    """Where an evaluation's report goes: ``eval.json`` under the run's own settings; under others
    (``--set``, ``--episodes`` not the config's) ``evals/`` + what changed, e.g.
    ``evals/eval.seed=3000000.json``, so the run's own report is never overwritten."""
    changes = {key: now for key, (_, now) in unrecorded_changes(run).items()}
    if episodes != run.cfg.eval.episodes:
        changes["episodes"] = episodes
    if not changes:
        return run.path("eval.json")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={v}" for k, v in sorted(changes.items())))
    if len(name) > 120:
        name = hashlib.sha256(name.encode()).hexdigest()[:16]
    return run.path("evals", f"{name}.json")


def _earlier_baseline(run: Run, seeds: list[int], policy: str, path: Path) -> list[dict] | None:
    """A baseline's episodes ("random" or "pacing") from an earlier report at ``path`` when they
    were played on the same env, frame skip, seeds, step limit and pacing period (they do not
    depend on the agent); None otherwise."""
    env = run.cfg.env
    try:
        report = json.loads(path.read_text())
        same = (report["env"] == env.name and report["frame_skip"] == env.frame_skip
                and report["seeds"] == [seeds[0], seeds[-1]] and report["max_steps"] == env.max_steps
                and report[policy]["episodes"] == len(seeds)
                and (policy != "pacing" or report[policy]["pacer_steps"] == run.cfg.eval.pacer_steps))
        episodes = report[policy]["episodes_detail"]
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or from before these were kept
        return None
    return episodes if same and isinstance(episodes, list) and len(episodes) == len(seeds) else None


def evaluate_run(run: Run, episodes: int | None = None, workers: int | None = None,
                 backend: str | None = None, video: bool = False, progress: bool = True) -> dict:
    """Evaluate the run's agent and the baselines on the same seeds; write eval.json (or, under
    other settings than the run's, a report in evals/: ``report_path``)."""
    cfg = run.cfg
    if episodes is not None and episodes < 1:
        raise UserError(f"--episodes {episodes}: must be at least 1")
    episodes = episodes or cfg.eval.episodes
    path = report_path(run, episodes)
    seeds = list(range(cfg.eval.seed, cfg.eval.seed + episodes))
    agent = load_agent(run.dir, cfg)  # fail fast, in this process, on a missing or mismatched model
    members = len(agent.members) if isinstance(agent, Committee) else 1
    video_seeds = tuple(seeds[: cfg.eval.video_episodes]) if video else ()
    start = time.perf_counter()
    agent = play_many(run, "agent", seeds, None, workers, backend, video_seeds, progress, "agent")
    agent_s = time.perf_counter() - start
    random = _earlier_baseline(run, seeds, "random", path)
    if random is None:
        random = play_many(run, "random", seeds, None, workers, backend, (), progress, "random policy")
    pacing = None
    if cfg.eval.pacer_steps:
        pacing = _earlier_baseline(run, seeds, "pacing", path)
        if pacing is None:
            pacing = play_many(run, "pacing", seeds, None, workers, backend, (), progress, "blind pacer")
    dream = dream_score(run, episodes, cfg.eval.seed)
    pacing_dream = dream_score(run, episodes, cfg.eval.seed, "pacing") if pacing is not None else None
    report = {
        "env": cfg.env.name,
        "seeds": [seeds[0], seeds[-1]],
        "frame_skip": cfg.env.frame_skip,
        "max_steps": cfg.env.max_steps,
        "real_noise": cfg.controller.real_noise,
        "shield": cfg.controller.shield,
        **({"committee": members} if members > 1 else {}),
        "agent": {**_stats([r["return"] for r in agent]), "episodes_detail": agent},
        "random": {**_stats([r["return"] for r in random]), "episodes_detail": random},
        **({"pacing": {**_stats([r["return"] for r in pacing]), "pacer_steps": cfg.eval.pacer_steps,
                       "dream": pacing_dream, "episodes_detail": pacing}} if pacing is not None else {}),
        "dream": dream,
        "wall_seconds": agent_s,
        "videos": [str(_video_path({"run": str(run.dir), "policy": "agent", "video_seeds": video_seeds}, s))
                   for s in video_seeds],
    }
    write_json(path, report)
    return {**scores(report), "seconds": agent_s, "report": str(path),
            **({"videos": ", ".join(report["videos"])} if video_seeds else {})}


def scores(report: dict) -> dict[str, str]:
    """The lines of an eval.json worth printing: the agent's score, the baselines', the dream's."""
    a, r = report["agent"], report["random"]
    lines = {
        "agent": f"{a['mean']:.1f} ± {a['std']:.1f} (min {a['min']:.0f}, max {a['max']:.0f}) "
                 f"over {a['episodes']} episodes",
        "random policy": f"{r['mean']:.1f} ± {r['std']:.1f} on the same seeds",
    }
    if report.get("committee"):
        lines["committee"] = f"select's {report['committee']} best controllers played together (the median action)"
    if report.get("shield"):
        detail = a.get("episodes_detail", [])
        replaced = sum(e.get("shielded", 0) for e in detail) / max(1, sum(e["steps"] for e in detail))
        lines["shield"] = f"margin {report['shield']:g}: the critic replaced {100 * replaced:.2f} % of the agent's actions"
    if "dream" in report:  # the same controller in M's dream, beside its real score
        d = report["dream"]
        lines["agent in the dream"] = f"{d['mean']:.1f} ± {d['std']:.1f} over {d['episodes']} dreams (τ {d['temperature']})"
    if "pacing" in report:
        p = report["pacing"]
        lines["blind pacer"] = f"{p['mean']:.1f} ± {p['std']:.1f} on the same seeds ({p['pacer_steps']} steps a leg)"
        if p.get("dream"):
            lines["blind pacer in the dream"] = f"{p['dream']['mean']:.1f} ± {p['dream']['std']:.1f} (the same dreams)"
    return lines
