"""The agent's collection in ``iterate``: several games in lockstep (ours) against one at a time.

``iterate`` collects its episodes with the agent (V, M, the critic's shield and C) plus action
noise.  Each worker now plays ``agents.collect.AGENT_ENVS`` games in lockstep, V and M batched
over them, refilling a game as its episode ends (:func:`agents.collect.run_agent_episodes`); the
baseline is the same function with one game, which plays an episode at a time with batches of
one, as every worker did before.  Both run here in one thread, as a worker does, on the same
seeds and noise, rounds alternating; the games are started beforehand and nothing is written.
The script prints steps per second of each, the ratio, and whether every episode came out the
same (float rounding with the batch may move an action by ~1e-6).

    python benchmarks/collect_agent.py                        # the shipped agent (pretrained/takecover)
    python benchmarks/collect_agent.py --run runs/w1 --rounds 2

Results: docs/benchmarks.md, "The agent's collection".
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

import envs
from agents.agent import Agent
from agents.collect import AGENT_ENVS, episode_seed, run_agent_episodes
from agents.iterate import _current_controller
from worldmodel.runs import open_run

ROOT = Path(__file__).resolve().parents[1]


def play(games: list, agent: Agent, noise: float, seeds: list[int], max_steps: int) -> tuple[float, int, dict]:
    start = time.perf_counter()
    episodes = {k: episode for k, episode, _ in run_agent_episodes(games, agent, noise, seeds, max_steps)}
    seconds = time.perf_counter() - start
    return seconds, sum(len(e["action"]) for e in episodes.values()), episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained" / "takecover",
                        help="a run with V, M and a controller (default: the shipped agent)")
    parser.add_argument("--episodes", type=int, default=48, help="episodes per round and arm (a worker's task at most)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--envs", type=int, default=AGENT_ENVS, help="games in lockstep (ours)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a collect worker
    run = open_run(args.run, None, create=False)
    cfg = run.cfg
    params = _current_controller(run)[0] if run.path("cmaes.pkl").exists() else None
    agent = Agent.from_run(run.dir, cfg, params)
    seeds = [episode_seed(cfg.collect.seed + 1, i) for i in range(args.episodes)]
    games = [envs.make_from_config(cfg.env) for _ in range(args.envs)]
    times: dict[str, list[float]] = {"one at a time": [], "lockstep": []}
    results: dict[str, dict] = {}
    steps = 0
    try:
        for r in range(args.rounds):
            for label, arm in (("one at a time", games[:1]), ("lockstep", games)):
                seconds, steps, results[label] = play(arm, agent, cfg.iterate.noise, seeds, cfg.collect.max_steps)
                times[label].append(seconds)
                print(f"round {r + 1}, {label}: {steps} steps in {seconds:.1f} s, {steps / seconds:.0f} steps/s",
                      flush=True)
    finally:
        for game in games:
            game.close()
    one, many = results["one at a time"], results["lockstep"]
    same_steps = all(len(one[k]["action"]) == len(many[k]["action"]) for k in one)
    largest = max(float(np.abs(one[k]["action"] - many[k]["action"]).max()) for k in one) if same_steps else None
    print(f"torch {torch.__version__}, one thread, {platform.processor() or platform.machine()}; run {args.run}: "
          f"LSTM {cfg.model.hidden}, shield {cfg.controller.shield}, noise {cfg.iterate.noise}; "
          f"{args.episodes} episodes, {steps} steps")
    for label, ts in times.items():
        print(f"{label}: {steps / min(ts):.0f} steps/s (best of {len(ts)} rounds)")
    same = f"yes, actions within {largest:.1e}" if same_steps else "no (lengths differ)"
    print(f"lockstep of {args.envs} / one at a time: {min(times['one at a time']) / min(times['lockstep']):.2f}x "
          f"faster; same episodes: {same}")


if __name__ == "__main__":
    main()
