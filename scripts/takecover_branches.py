"""Could the agent have dodged the fireball that killed it, and does its dream know?

    python scripts/takecover_branches.py --run pretrained/takecover [--episodes 30] [--seed 10000]
                                         [--before 3 6 12 20 30] [--window 30] [--dreams 64]

Plays the run's agent (V -> M -> C, as ``evaluate`` plays it) on the evaluation seeds.  For every
episode that ends in a death at step T and every k in ``--before``, it branches at t = T - k:

- **in the game**: a fresh episode of the same seed replays the agent's actions 0 … t-1 (ViZDoom
  is deterministic for a seed and an action sequence; checked per episode by replaying all T
  actions), then holds left, stay or right, in the game as the run plays it (its
  ``env.frame_skip`` and ``env.max_steps``).  The branch *escapes* if it is alive k + ``--window``
  steps after t (or at the step cap).  The agent's own continuation dies at T by construction.
- **in the dream**: the run's dream M (all ensemble members, as CMA-ES dreams) starts from the
  state the agent's M had at t and V's z of frame t, and ``--dreams`` dreams (common noise across
  the branches) play the agent's controller, or hold left, stay or right, for the same k +
  ``--window`` steps, ending as the run's dreams end (``cmaes.done``, ``done_threshold``,
  ``ensemble_done``, τ).  The cell is the share of those dreams that end in a death.

A dream that teaches dodging gives the agent's continuation a high P(death) a few steps before the
real death, and gives the branches that really escape a lower one than those that really die.
Results: docs/results.md, "Could the agent have dodged?".
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
from collections import deque
from itertools import chain, repeat
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOLDS = {"left": -1.0, "stay": 0.0, "right": 1.0}
_ENV = None  # one ViZDoom per worker process


def _env(frame_skip: int, max_steps: int):
    global _ENV
    if _ENV is None or (_ENV.frame_skip, _ENV.max_steps) != (frame_skip, max_steps):
        from envs.takecover import TakeCoverEnv

        if _ENV is not None:
            _ENV.close()
        _ENV = TakeCoverEnv(frame_skip=frame_skip, max_steps=max_steps)
        atexit.register(_ENV.close)  # else ViZDoom's engine process outlives the worker
    return _ENV


def replay(seed: int, actions: np.ndarray, hold: float | None = None, steps: int = 0,
           frame_skip: int = 1, max_steps: int = 2100) -> tuple[int, bool]:
    """Replay ``actions`` on ``seed``, then hold ``hold`` for ``steps`` steps, in the game as the run
    plays it (``env.frame_skip`` tics a step, ``env.max_steps`` steps at most).

    Returns the steps played (len(actions) + steps unless the episode ended first) and whether the
    player died (an episode cut by the step cap did not)."""
    env = _env(frame_skip, max_steps)
    env.reset(seed=seed)
    n, terminated = 0, False
    for a in chain(actions, repeat(hold, steps)):
        n += 1
        _, _, terminated, truncated, _ = env.step(np.array([a], np.float32))
        if terminated or truncated:
            break
    return n, bool(terminated)


def _real_task(task: tuple) -> tuple:
    key, seed, prefix, hold, steps, game = task
    return key, replay(seed, prefix, hold, steps, *game)


def play(env, agent, seed: int, keep: int, dream_m=None) -> dict:
    """One episode of the agent; for its last ``keep`` steps, (the dream M's state before the step, z).

    The dream M is the agent's own (``dream_m`` None) or ``dream_m``, which then follows the same z's
    and actions from its own initial state."""
    import torch

    frame, _ = env.reset(seed=seed)
    agent.reset(1, [seed])
    state = None if dream_m is None else dream_m.initial_state(1)
    recent, actions = deque(maxlen=keep), []
    terminated = truncated = False
    while not (terminated or truncated):
        before = tuple(s.clone() for s in (agent.state if dream_m is None else state))
        a = agent.act(frame[None])
        z = agent.last_z  # (1, Z): the frame's z, as the agent's M observed it
        recent.append((before, z))
        if dream_m is not None:
            with torch.inference_mode():
                state = dream_m.observe(state, z, torch.as_tensor(a))
        actions.append(float(a[0, 0]))
        frame, _, terminated, truncated, _ = env.step(a[0])
    return {"seed": seed, "steps": len(actions), "died": bool(terminated), "actions": np.array(actions, np.float32),
            "recent": list(recent)}


def dream_deaths(m, spec, settings, params, state, z, window: int, dreams: int, seed: int) -> dict[str, float]:
    """Share of ``dreams`` dreams from (state, z) that die within ``window`` steps, per branch
    (the agent's controller only when ``params`` is given)."""
    from dataclasses import replace

    import torch

    from envs.dream import dream_rollouts

    shares = {}
    s = replace(settings, max_steps=window)
    state0 = tuple(x.repeat(dreams, *[1] * (x.dim() - 1)) for x in state)
    z0 = z.reshape(1, -1).repeat(dreams, 1)
    for name in ("agent", *HOLDS) if params is not None else HOLDS:
        g = torch.Generator().manual_seed(seed)  # the same noise for every branch
        if name == "agent":
            p, policy = params[None].repeat(dreams, 1), None
        else:
            p, value = torch.zeros(dreams, 0), HOLDS[name]
            policy = lambda t, f, v=value: f.new_full((f.shape[0], 1), v)  # noqa: E731
        r = dream_rollouts(m, p, spec, z0, s, g, policy=policy, state0=state0)
        shares[name] = float(r.terminated.float().mean())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a TakeCover run folder with vae.pt, m.pt, controller.pt")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=10_000, help="first seed (eval.seed)")
    parser.add_argument("--before", type=int, nargs="+", default=[3, 6, 12, 20, 30],
                        help="branch k steps before each death")
    parser.add_argument("--window", type=int, default=30, help="a branch escapes if alive k + WINDOW steps later")
    parser.add_argument("--dreams", type=int, default=64, help="dreams per branch")
    parser.add_argument("--workers", type=int, default=2, help="processes replaying the game")
    parser.add_argument("--json", type=Path, help="write every branch point's numbers here")
    parser.add_argument("--dream-run", help="judge the branches in this run's dream M instead (same V; e.g. a "
                        "candidate M trained on the run's data); its agent branch is left out")
    args = parser.parse_args()

    import torch

    import envs
    from agents.agent import Agent
    from agents.controller import ControllerSpec, load_controller
    from agents.workers import run_tasks
    from envs.dream import DreamSettings, load_world_model
    from worldmodel.errors import UserError
    from worldmodel.runs import open_run
    from worldmodel.vae import load_vae

    torch.set_num_threads(2)
    try:
        if args.episodes < 1 or args.dreams < 1 or args.window < 1 or min(args.before) < 1:
            raise UserError("--episodes, --dreams, --window and every --before must be at least 1")
        run = open_run(args.run, None, create=False)
        if run.cfg.env.name != "takecover":
            raise UserError(f"{args.run}: a {run.cfg.env.name} run; this script replays TakeCover")
        m = load_world_model(run).eval()
        vae = load_vae(run.vae_path, run.cfg.vae.z_dim)
        spec = ControllerSpec.for_config(run.cfg, m)
        params, _ = load_controller(run.dir / "controller.pt", spec=spec)
        dream_run = dream_m = None
        if args.dream_run:
            dream_run = open_run(args.dream_run, None, create=False)
            if dream_run.vae_path.read_bytes() != run.vae_path.read_bytes():
                raise UserError(f"{dream_run.vae_path}: not the V of {run.vae_path}; the dream M must read the same z")
            dream_m = load_world_model(dream_run).eval()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    # The agent plays with the whole dream M: its features are member 0's, as with m.pt alone, and
    # its state then holds every member's, to start the dream branches from.
    agent = Agent(vae, m, spec, np.asarray(params, np.float32), run.cfg.controller.features,
                  real_z=run.cfg.controller.real_z)
    settings = DreamSettings.from_config((dream_run or run).cfg)
    params_t = torch.as_tensor(np.asarray(params, np.float32)) if dream_m is None else None
    before = sorted(set(args.before))
    env = envs.make_from_config(run.cfg.env)
    episodes = []
    for seed in range(args.seed, args.seed + args.episodes):
        episodes.append(play(env, agent, seed, max(before), dream_m))
        e = episodes[-1]
        print(f"played seed {seed}: {e['steps']} steps, {'died' if e['died'] else 'step limit'}", flush=True)
    env.close()

    deaths = [e for e in episodes if e["died"]]
    points = [(e, k, e["steps"] - k) for e in deaths for k in before if e["steps"] > k]  # branch at t = T - k >= 1
    game = (run.cfg.env.frame_skip, run.cfg.env.max_steps)
    tasks = [(("check", e["seed"]), e["seed"], e["actions"], None, 0, game) for e in deaths]
    tasks += [((e["seed"], k, name), e["seed"], e["actions"][:t], value, k + args.window, game)
              for e, k, t in points for name, value in HOLDS.items()]
    real = dict(result for _, result in run_tasks(_real_task, tasks, args.workers))
    rows = []
    for e, k, t in points:
        deterministic = real[("check", e["seed"])] == (e["steps"], True)
        state, z = e["recent"][-k]  # M's state before step t = T - k, and z_t
        dream = dream_deaths(m if dream_m is None else dream_m, spec, settings, params_t, state, z, k + args.window, args.dreams,
                             e["seed"] * 100 + k)
        escaped = {n: not real[(e["seed"], k, n)][1] for n in HOLDS}  # alive k + window steps later
        rows.append({"seed": e["seed"], "k": k, "deterministic": bool(deterministic), "press": press(e["actions"][t]),
                     "escaped": escaped, "dream": dream})
    n_det = sum(r["deterministic"] for r in rows if r["k"] == before[0])
    print(f"\n{len(episodes)} episodes, {len(deaths)} deaths; replaying the agent's actions ends at the same "
          f"step in {n_det} of {len({r['seed'] for r in rows})} (branches of the others are left out)")
    report(rows, before, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
        print(f"wrote {args.json}")


def press(action: float) -> str:
    """The hold that repeats ``action``'s button (the game's own mapping, envs.takecover.discretize)."""
    from envs.takecover import discretize

    left, right = discretize(float(action))
    return "left" if left else "right" if right else "stay"


def relative(row: dict) -> dict[str, str]:
    """The holds named by what they do to the agent's motion at the branch: keep, stop, reverse."""
    keep = row["press"]
    return {"keep": keep, "stop": "stay", "reverse": {"left": "right", "right": "left"}[keep]}


def concordance(row: dict) -> list[float]:
    """Per pair (a hold that escapes in the game, one that dies): 1 if the dream gives the escaping
    one the lower P(death), 0.5 on a tie, else 0."""
    live = [n for n in HOLDS if row["escaped"][n]]
    die = [n for n in HOLDS if not row["escaped"][n]]
    return [float(np.sign(row["dream"][d] - row["dream"][a]) + 1) / 2 for a in live for d in die]


def report(rows: list[dict], before: list[int], args) -> None:
    rows = [r for r in rows if r["deterministic"] and r["press"] != "stay"]
    print(f"\nBranch k steps before each death (where the agent was moving); hold for k + {args.window} steps.\n"
          f"game: share of the deaths that the hold escapes; dream: share of {args.dreams} dreams that die\n"
          "(agent: its own controller).  keep / stop / reverse: the agent's direction at the branch, stay,\n"
          "the other direction.  concordance: over pairs (a hold that escapes in the game, one that dies),\n"
          "how often the dream gives the escaping one the lower P(death) (0.5: it cannot tell them apart).")
    print("  k  deaths | game: keep  stop  rev.  any | dream: agent  keep  stop  rev. | concordance (pairs)")
    for k in before:
        sel = [r for r in rows if r["k"] == k]
        if not sel:
            continue
        rel = [relative(r) for r in sel]
        esc = {n: np.mean([r["escaped"][m[n]] for r, m in zip(sel, rel)]) for n in ("keep", "stop", "reverse")}
        dr = {n: np.mean([r["dream"][m[n]] for r, m in zip(sel, rel)]) for n in ("keep", "stop", "reverse")}
        anyone = np.mean([any(r["escaped"].values()) for r in sel])
        pairs = [c for r in sel for c in concordance(r)]
        agent = np.mean([r["dream"].get("agent", np.nan) for r in sel])
        print(f"{k:3d} {len(sel):7d} | {esc['keep']:10.2f} {esc['stop']:5.2f} {esc['reverse']:5.2f} {anyone:4.2f} | "
              f"{agent:12.2f} {dr['keep']:5.2f} {dr['stop']:5.2f} {dr['reverse']:5.2f} | "
              f"{np.mean(pairs) if pairs else float('nan'):11.2f} ({len(pairs)})")


if __name__ == "__main__":
    main()
