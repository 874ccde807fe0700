"""What a TakeCover agent does in real Doom, and what V shows it before a fireball hits.

    python scripts/takecover_traces.py --run pretrained/takecover [--episodes 20] [--seed 10000]
                                       [--pacer 110] [--recon frames.png]

Plays the run's agent (V -> M -> C, as ``evaluate`` plays it) one episode at a time on the
evaluation seeds, or with ``--pacer K`` the blind pacer (agents/policies.py), and reads two
game variables that no policy sees: the lateral position (POSITION_Y; the room spans about
16 ... 752) and HEALTH.  Per episode: the steps survived, fireball hits, the shares of left /
stay / right, the turns, and at a death the speed (position units a step over the last 5)
and the steps since the last turn.  The summary follows.

``--recon PNG`` (the agent only) saves, for the first three episodes with a hit, the frames
30, 20, 12, 6, 2 and 0 steps before the first hit, each row above V's reconstruction of it.
Results: docs/results.md, "What the plateau is".
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path

import numpy as np

BEFORE_HIT = (30, 20, 12, 6, 2, 0)


def press(action: np.ndarray) -> int:
    """-1 / 0 / +1: the button TakeCover presses for ``action`` (left / none / right)."""
    from envs.takecover import discretize

    left, right = discretize(float(np.asarray(action).reshape(-1)[0]))
    return right - left


def play(env, policy, seed: int, keep_frames: bool) -> dict:
    frame, _ = env.reset(seed=seed)
    policy.reset(seed)
    ys, health, presses, frames, before_hit = [], [100.0], [], deque(maxlen=max(BEFORE_HIT) + 1), None
    terminated = truncated = False
    while not (terminated or truncated):
        frames.append(frame)
        a = policy.act(frame)
        frame, _, terminated, truncated, _ = env.step(a)
        ys.append(env.game_variable("POSITION_Y"))
        health.append(env.game_variable("HEALTH"))
        presses.append(press(a))
        if keep_frames and before_hit is None and health[-1] < health[-2] and len(frames) > max(BEFORE_HIT):
            before_hit = np.stack([frames[-1 - k] for k in BEFORE_HIT])
    ys, presses = np.array(ys), np.array(presses)
    moves = np.flatnonzero(presses != 0)  # the steps that pressed left or right
    turns = np.flatnonzero(np.diff(presses[moves]) != 0)
    # steps from the press that began the last leg to the end
    since_turn = int(len(presses) - 1 - moves[turns[-1] + 1]) if len(turns) else None
    return {"seed": seed, "steps": len(presses), "died": bool(terminated),
            "hits": int((np.diff(health) < 0).sum()),
            "shares": [float((presses == v).mean()) for v in (-1, 0, 1)], "turns": len(turns),
            "speed_at_end": float(np.abs(np.diff(ys[-6:])).mean()) if len(ys) > 5 else 0.0,
            "since_turn": since_turn, "y_range": (float(ys.min()), float(ys.max())), "y_end": float(ys[-1]),
            "before_hit": before_hit}


class AgentPolicy:
    def __init__(self, agent):
        self.agent = agent

    def reset(self, seed: int) -> None:
        self.agent.reset(1, [seed])

    def act(self, frame: np.ndarray) -> np.ndarray:
        return self.agent.act(frame[None])[0]


class Pacer:
    def __init__(self, steps: int):
        from agents.policies import PacingPolicy

        self.pacer = PacingPolicy(steps)

    def reset(self, seed: int) -> None:
        self.pacer.reset()

    def act(self, frame: np.ndarray) -> np.ndarray:
        return self.pacer.act(frame)


def save_recon(path: Path, vae, shots: list[np.ndarray]) -> None:
    import torch
    from PIL import Image

    from agents.watch import decode
    from worldmodel.vae import encode_frames

    rows = []
    for frames in shots:
        recon = decode(vae, torch.from_numpy(encode_frames(vae, frames, len(frames))[0]))
        rows += [np.concatenate(list(frames), 1), np.concatenate(list(recon), 1)]
    image = np.concatenate(rows, 0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a TakeCover run folder with vae.pt, m.pt, controller.pt")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=10_000, help="first seed (eval.seed)")
    parser.add_argument("--pacer", type=int, default=0, metavar="K", help="play the blind pacer, K steps a leg")
    parser.add_argument("--recon", type=Path, help="PNG of frames before the first hits and V's reconstructions")
    args = parser.parse_args()

    import torch

    import envs
    from agents.agent import Agent
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run

    torch.set_num_threads(2)
    try:
        if args.episodes < 1:
            raise UserError(f"--episodes {args.episodes}: must be at least 1")
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: a {run.cfg.env.name} run; this script reads TakeCover's game variables")
        agent = Agent.from_run(run.dir, run.cfg)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    policy = Pacer(args.pacer) if args.pacer else AgentPolicy(agent)
    env = envs.make_from_config(run.cfg.env)
    results = []
    print("seed    steps hits  left/stay/right  turns  y range    at the end: y, speed, steps since turn")
    for seed in range(args.seed, args.seed + args.episodes):
        r = play(env, policy, seed, keep_frames=args.recon is not None and not args.pacer)
        results.append(r)
        shares = "/".join(f"{100 * s:.0f}" for s in r["shares"])
        end = f"{r['y_end']:.0f}, {r['speed_at_end']:.1f}, {r['since_turn']}" if r["died"] else "(step limit)"
        print(f"{seed}  {r['steps']:5d} {r['hits']:4d}  {shares:>15}  {r['turns']:5d}  "
              f"{r['y_range'][0]:.0f}-{r['y_range'][1]:.0f}  {end}", flush=True)
    env.close()
    deaths = [r for r in results if r["died"]]
    steps = np.array([r["steps"] for r in results], float)
    shares = "/".join(f"{100 * np.mean([r['shares'][i] for r in results]):.0f}" for i in range(3))
    print(f"\n{len(results)} episodes: {steps.mean():.1f} ± {steps.std():.1f} steps; "
          f"{np.mean([r['hits'] for r in results]):.2f} hits an episode; "
          f"{len(deaths)} deaths, {np.mean([r['hits'] for r in deaths]) if deaths else 0:.2f} hits each; "
          f"left/stay/right {shares} %")
    if deaths:
        since = [r["since_turn"] for r in deaths if r["since_turn"] is not None]
        print(f"at death: speed {np.mean([r['speed_at_end'] for r in deaths]):.1f} a step "
              f"(full speed ≈ 7); median {np.median(since) if since else float('nan'):.0f} steps since the last turn")
    shots = [r["before_hit"] for r in results if r["before_hit"] is not None][:3]
    if args.recon is not None and shots:
        save_recon(args.recon, agent.vae, shots)
        print(f"wrote {args.recon} ({len(shots)} episodes; columns: {', '.join(map(str, BEFORE_HIT))} steps before the hit)")


if __name__ == "__main__":
    main()
