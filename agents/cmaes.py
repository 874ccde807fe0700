"""C trained inside M's dream with CMA-ES (``python run.py dream``).

Each generation, pycma proposes ``population`` controllers; every one of them, plus the
distribution mean (the *centre*), dreams ``rollouts`` times, all in one batched call of
:func:`envs.dream.dream_rollouts`.  Fitness is the mean dream return (pycma minimises,
so it is told the negative).  On a CPU the batch is split over one-thread processes, each
dreaming a share of the candidates (``cmaes.workers``; agents/dream_workers.py): the same
dreams but for the rounding of bfloat16 products, faster.  Rollout j of every candidate starts from the same z and
sees the same noise (common random numbers, fresh each generation), so candidates are
compared on equal luck.  With ``cmaes.midway_starts``, the last of those rollouts start inside
real episodes (:class:`envs.dream.MidwayStarts`, a pool of ``MIDWAY_POOL`` points built once
per search from M and the run's latents), so the late game is trained as well as the first steps.

Every ``eval_every`` generations (and at the last one) the centre — the current best
estimate, as in the paper's code; the best single candidate's dream score is the max of
noisy estimates — is played in the real game through ``evaluate_fn``, and its dream and
real scores are logged side by side.

Files in the run folder (all written atomically, once per generation):

- ``cmaes.pkl``: pickled state — the CMA-ES object (its private numpy RandomState inside,
  so pycma never touches numpy's global RNG), generation, best controllers, history, and
  the tags of :func:`restart_search` (``iterate.restart``).  Rerunning resumes exactly
  there.  A pickle can run code when loaded: it is only ever read from the run's own
  folder, and never from a path under ``pretrained/``.
- ``controller.pt`` (``run.controller_path``): the controller with the best *real* score
  among the checks played with the current M (C reads M's h, so a controller checked with
  an earlier M — before an iteration retrained it — plays differently now), else the
  candidate with the best dream fitness so far
  ("pick the controller by a held-out real evaluation, not by dream score alone").
  The best of many checks on the same few episodes overstates its score; agents/select.py
  then re-plays the best few checked controllers on fresh episodes and keeps the winner.
- ``controller_dream.pt``: the best-dream-fitness candidate, always.
- ``metrics/dream.jsonl``: one record per generation; ``plots/dream.png`` drawn from it by
  :func:`worldmodel.plots.plot_run` after every real check and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cma
import numpy as np
import torch
from tqdm import tqdm

from agents.controller import ControllerSpec, save_controller
from agents.dream_workers import DreamPool, dream_workers
from envs.dream import (
    DreamSettings,
    MidwayStarts,
    dream_rollouts,
    load_start_latents,
    load_world_model,
    midway_starts,
    posterior_sample,
    sample_start_z,
)
from worldmodel.config import LEGACY_BRAKE
from worldmodel.errors import UserError
from worldmodel.io import append_jsonl, atomic_path, write_text
from worldmodel.latents import Latents, load_latents
from worldmodel.m import WorldModel
from worldmodel.plots import plot_run
from worldmodel.runs import Run
from worldmodel.torch_utils import resolve_device

#: evaluate_fn(params (P,), episodes, seed[, m_path=...]) -> real returns; ``m_path`` plays the
#: controller with another M file than the run's m.pt (agents/select.py).
EvaluateFn = Callable[..., list]

STATE_FILE = "cmaes.pkl"
DREAM_CONTROLLER_FILE = "controller_dream.pt"
STATE_VERSION = 1
#: Seed handed to ``evaluate_fn`` (plus ``cmaes.seed``): the same episodes at every check,
#: so real scores of different generations compare on equal luck.
EVAL_SEED_BASE = 1_000_000
MIDWAY_POOL = 512  # start points inside real episodes per search (cmaes.midway_starts)


# ----------------------------------------------------------------- one generation

def weights_fingerprint(m: torch.nn.Module) -> str:
    """Short hash of M's weights (every member's, for an ensemble): which M a real check was
    played with.  Metadata and file bytes do not count, so re-saving the same weights keeps it."""
    h = hashlib.sha256()
    for name, value in sorted(m.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def m_snapshot_path(run: Run, m_id: str, member: int = 0) -> Path:
    """Where the copy of the M with fingerprint ``m_id`` (:func:`weights_fingerprint`) is kept:
    ``m_history/<m_id>.pt``; an ensemble's other members beside it (``<m_id>.m1.pt`` ...)."""
    return run.m_snapshot_path(m_id, member)


def current_m_id(run: Run) -> str:
    """The fingerprint of the run's M as it is on disk now (``m.pt``): the name of its snapshot."""
    return weights_fingerprint(load_world_model(run))


def keep_m_snapshot(run: Run, m_id: str) -> None:
    """Copy the run's M files (every member of an ensemble) to ``m_history/`` (once), so that
    ``select`` can later play a controller checked with this M after ``iterate`` has trained M on.
    The first member's copy is written last: its presence means the snapshot is whole.  Then
    ``m_history/index.json`` records it as the newest (the order ``controller.shield_critics`` reads)."""
    if not run.m_path.exists():
        return
    if not m_snapshot_path(run, m_id).exists():
        m_snapshot_path(run, m_id).parent.mkdir(exist_ok=True)
        for k in reversed(range(run.m_files)):
            with atomic_path(m_snapshot_path(run, m_id, k)) as tmp:
                shutil.copyfile(run.member_path(k), tmp)
    run.record_m_snapshot(m_id)


def generation_seed(seed: int, generation: int) -> int:
    """Torch seed of a generation's dreams: a pure function of (seed, generation), so resume is exact."""
    return int(np.random.SeedSequence([seed, generation]).generate_state(1, np.uint64)[0] >> 1)


def dream_fitness(m: WorldModel, candidates: np.ndarray, spec: ControllerSpec, settings: DreamSettings,
                  starts: torch.Tensor, rollouts: int, generator: torch.Generator,
                  midway: MidwayStarts | None = None, n_midway: int = 0) -> tuple[np.ndarray, float, int]:
    """Mean dream return of each candidate over ``rollouts`` common-noise dreams.

    candidates: (C, P) -> (fitness (C,), mean dream length, total dream steps).
    Row i * rollouts + j of the batch is candidate i, rollout j, noise stream j.  The last
    ``n_midway`` rollouts start at points of ``midway`` (the same points for every candidate).
    """
    device = starts.device
    n_cand = candidates.shape[0]
    z0 = sample_start_z(starts, rollouts - n_midway, generator).to(device)  # (R - k, Z)
    state0 = elapsed = None
    if n_midway:
        idx = torch.randint(len(midway), (n_midway,), generator=generator).to(midway.latents.device)
        z0 = torch.cat([z0, posterior_sample(midway.latents[idx], generator).to(device)])
        state0 = tuple(torch.cat([s0, s[idx]]).repeat(n_cand, *[1] * (s.dim() - 1))
                       for s0, s in zip(m.initial_state(rollouts - n_midway), midway.state))
        elapsed = torch.cat([torch.zeros(rollouts - n_midway, dtype=torch.int64, device=device),
                             midway.elapsed[idx].to(device)]).repeat(n_cand)
    params = torch.as_tensor(candidates, dtype=torch.float32, device=device).repeat_interleave(rollouts, 0)
    streams = torch.arange(rollouts, device=device).repeat(n_cand)
    result = dream_rollouts(m, params, spec, z0.repeat(n_cand, 1), settings, generator, streams,
                            state0=state0, elapsed=elapsed)
    fitness = result.returns.view(n_cand, rollouts).mean(1).cpu().numpy().astype(np.float64)
    return fitness, float(result.lengths.float().mean()), int(result.lengths.sum())


# ----------------------------------------------------------------- state file

def _new_es(num_params: int, c, restart: int = 0, mean: np.ndarray | None = None) -> cma.CMAEvolutionStrategy:
    """A distribution centred on ``mean`` (None: 0) with step size ``cmaes.sigma0``; ``restart`` k > 0
    seeds its own draws."""
    if c.sigma0 <= 0:
        raise UserError(f"config cmaes.sigma0: {c.sigma0} must be above 0")
    rng = np.random.RandomState([c.seed, restart] if restart else c.seed)
    opts = {"popsize": c.population, "seed": np.nan, "randn": rng.randn, "verbose": -9, "verb_log": 0,
            "verb_disp": 0}
    x0 = np.zeros(num_params) if mean is None else np.asarray(mean, np.float64)
    if x0.shape != (num_params,):
        raise ValueError(f"restart mean has shape {x0.shape}, the search has {num_params} parameters")
    return cma.CMAEvolutionStrategy(x0, c.sigma0, opts)


def _new_state(num_params: int, c, brake: str | None = None) -> dict[str, Any]:
    """``brake``: CarRacing's ``controller.brake`` (the search's params mean another car under the other)."""
    return {"version": STATE_VERSION, "es": _new_es(num_params, c), "generation": 0, "num_params": num_params,
            "population": c.population, "seed": c.seed, "best_dream": None, "best_real": None,
            "checks": [], "history": [], "wall_s": 0.0, "restarts": [], **({"brake": brake} if brake else {})}


def _brake(spec: ControllerSpec) -> str | None:
    return spec.brake if spec.env == "carracing" else None


def best_check(checks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The check with the best real score (the earliest of equals), or None."""
    return max(checks, key=lambda ch: ch["real_score"], default=None)


def restart_search(run: Run, tag: int, best_above: float | None = None) -> bool:
    """Start CMA-ES afresh in ``cmaes.pkl`` (step size ``cmaes.sigma0``), once per ``tag``.

    The new distribution is centred on 0, or, given ``best_above``, on the controller of the best
    real check so far when it scored above that (a dream's exploiter, worse than the policy
    that collected the data, is no place to start).  The generation count, the real checks and the best
    controllers stay; only the search distribution is new.  Returns False (and changes nothing)
    when ``tag`` already restarted it, so a resumed iteration does not throw away the generations
    it has run since.
    """
    path = run.path(STATE_FILE)
    state = load_state(path)
    restarts = state.setdefault("restarts", [])
    if tag in restarts:
        return False
    best = best_check(state.get("checks", [])) if best_above is not None else None
    mean = best["params"] if best is not None and best["real_score"] > best_above else None
    state["es"] = _new_es(state["num_params"], run.cfg.cmaes, restart=tag, mean=mean)
    restarts.append(tag)
    save_state(path, state)
    return True


def add_check(run: Run, check: dict[str, Any]) -> bool:
    """Record a real score the dream did not play itself: ``iterate``'s collector, the centre after
    an iteration's last update, scored by the episodes it collected.  It joins the checks that
    agents/select.py picks from.  ``check["key"]`` names it (a check's default key is its
    generation); returns False (and changes nothing) when that key is already recorded."""
    path = run.path(STATE_FILE)
    state = load_state(path)
    checks = state.setdefault("checks", [])
    if any(check_key(ch) == check["key"] for ch in checks):
        return False
    checks.append(check)
    save_state(path, state)
    return True


def check_key(check: dict[str, Any]) -> str:
    """How select.json and ``add_check`` name a check: its ``key``, else its generation."""
    return str(check.get("key", check["generation"]))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a CMA-ES state (as :func:`load_state` returns it) to ``path``, atomically."""
    data = dict(state, es=state["es"].pickle_dumps())
    with atomic_path(path) as tmp:
        tmp.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))


def load_state(path: Path) -> dict[str, Any]:
    """Read a CMA-ES state file of this project's own run folder (see the module docstring)."""
    if "pretrained" in path.resolve().parts:
        raise UserError(f"{path}: refusing to unpickle a file under pretrained/ (pickles can run code)")
    try:
        data = pickle.loads(path.read_bytes())
        data["es"] = pickle.loads(data["es"])
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise UserError(f"{path}: cannot read CMA-ES state ({type(exc).__name__}); "
                        "delete it to restart the dream from generation 0") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise UserError(f"{path}: not a CMA-ES state file of this version")
    return data


def _check_resume(path: Path, state: dict[str, Any], spec: ControllerSpec, c) -> None:
    keys = [("num_params", spec.num_params), ("population", c.population), ("seed", c.seed)]
    if _brake(spec):  # a CarRacing search from before the key was kept
        state = {"brake": LEGACY_BRAKE, **state}
        keys.append(("brake", spec.brake))
    for key, now in keys:
        if state[key] != now:
            raise UserError(f"{path}: was started with {key} {state[key]}, now {now}; "
                            "use another run folder (or delete the file to restart)")


# ----------------------------------------------------------------- outputs

def _meta(spec: ControllerSpec, settings: DreamSettings, best: dict, source: str) -> dict[str, Any]:
    return {**spec.to_dict(), "features": settings.features, "source": source,
            "generation": int(best["generation"]), "dream_score": float(best["dream_score"]),
            "real_score": None if best.get("real_score") is None else float(best["real_score"])}


def _save_controllers(run: Run, state: dict, spec: ControllerSpec, settings: DreamSettings) -> None:
    """Write controller_dream.pt and controller.pt (best by real score when there is one)."""
    best_dream, best_real = state["best_dream"], state["best_real"]
    save_controller(run.path(DREAM_CONTROLLER_FILE), best_dream["params"],
                    _meta(spec, settings, best_dream, "dream"))
    source, best = ("real", best_real) if best_real is not None else ("dream", best_dream)
    save_controller(run.controller_path, best["params"], _meta(spec, settings, best, source))


# ----------------------------------------------------------------- the loop

def train_controller(run: Run, evaluate_fn: EvaluateFn | None = None, progress: bool = True, *,
                     m: WorldModel | None = None, starts: torch.Tensor | None = None,
                     data: Latents | None = None, pacer: dict | None = None) -> dict[str, Any]:
    """Evolve C in the dream until ``cmaes.generations``; resume from ``cmaes.pkl`` if present.

    evaluate_fn(params (P,), episodes, seed) -> real returns; None skips real checks.
    ``m`` / ``starts`` (E, 2, Z) / ``data`` (the episodes that ``cmaes.midway_starts`` starts
    dreams inside) default to the run's M and latents (tests pass their own).
    ``pacer``: the blind pacer's real episodes (:func:`agents.calibrate.real_pacer`), needed with
    ``cmaes.done_calibration`` > 0: the dream's done threshold is then calibrated for this M.
    Returns a summary dict.
    """
    cfg, c = run.cfg, run.cfg.cmaes
    device = resolve_device(cfg.system.device)
    runs_own_m = m is None
    m = (m if m is not None else load_world_model(run, device)).eval()
    device = next(m.parameters(), torch.zeros(0)).device
    starts = (starts if starts is not None else load_start_latents(run)).to(device)
    settings = DreamSettings.from_config(cfg)
    if settings.reward == "model" and getattr(m, "predict_reward", True) is False:
        raise UserError(f"config env.name {cfg.env.name!r}: the dream's reward comes from M's reward head, "
                        "but M was trained with model.predict_reward=false")
    spec = ControllerSpec.for_config(cfg, m)
    n_midway = round(c.rollouts * c.midway_starts)
    midway = None
    if n_midway:  # a pure function of M, the data and the seed: a resumed search sees the same pool
        data = data if data is not None else load_latents(run.latents_dir, cfg.vae.z_dim)
        midway = midway_starts(m, data, MIDWAY_POOL, np.random.default_rng([c.seed, MIDWAY_POOL]))
    m_id = weights_fingerprint(m)
    if runs_own_m and evaluate_fn is not None:
        keep_m_snapshot(run, m_id)
    if c.done_calibration > 0:
        settings = _calibrated(run, settings, m, m_id, starts, pacer)

    state_path = run.path(STATE_FILE)
    if state_path.exists():
        state = load_state(state_path)
        _check_resume(state_path, state, spec, c)
    else:
        state = _new_state(spec.num_params, c, _brake(spec))
    start_generation = state["generation"]
    metrics_path = run.metrics_path("dream")
    write_text(metrics_path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in state["history"]))

    bar = tqdm(total=c.generations, initial=start_generation, disable=not progress, desc="dream",
               unit="gen", dynamic_ncols=True)
    workers = dream_workers(c.workers, (c.population + 1) * c.rollouts, device)
    pool = None
    if workers > 1 and state["generation"] < c.generations:
        pool = DreamPool(workers, m, spec, starts, midway, n_midway, cfg.system.task_timeout)
    with pool or contextlib.nullcontext():
        while state["generation"] < c.generations:
            record = _one_generation(state, m, spec, settings, starts, c, evaluate_fn, m_id, midway, n_midway,
                                     pool)
            _save_controllers(run, state, spec, settings)
            save_state(state_path, state)
            append_jsonl(metrics_path, record)
            if record["real_mean"] is not None:
                plot_run(run, stages=("dream",))
            bar.update(1)
            bar.set_postfix(best=f"{record['dream_best']:.1f}", mean=f"{record['dream_mean']:.1f}",
                            real="-" if record["real_mean"] is None else f"{record['real_mean']:.1f}")
    bar.close()
    plot_run(run, stages=("dream",))
    if state["best_dream"] is None:
        raise UserError(f"{state_path}: no generation has run (cmaes.generations = {c.generations})")
    source = "real" if state["best_real"] is not None else "dream"
    best_real = state["best_real"]
    return {
        "generations": state["generation"],
        "resumed_from": start_generation,
        "num_params": spec.num_params,
        "best_dream_score": state["best_dream"]["dream_score"],
        "best_dream_generation": state["best_dream"]["generation"],
        "best_real_score": None if best_real is None else best_real["real_score"],
        "best_real_generation": None if best_real is None else best_real["generation"],
        "controller_path": str(run.controller_path),
        "controller_source": source,
        "wall_s": state["wall_s"],
    }


def _calibrated(run: Run, settings: DreamSettings, m: WorldModel, m_id: str, starts: torch.Tensor,
                pacer: dict | None) -> DreamSettings:
    """``settings`` with the done threshold calibrated for M on the blind pacer (agents/calibrate.py)."""
    from agents.calibrate import calibrated_threshold

    if pacer is None:
        raise UserError("config cmaes.done_calibration: the dream calibrates on the blind pacer's real episodes; "
                        "run it with `python run.py dream` (or pipeline / iterate), which plays them")
    entry = calibrated_threshold(run, m, m_id, starts, pacer)
    print(f"dream: done threshold {entry['threshold']:.4f} for M {m_id}: the blind pacer lives "
          f"{entry['pacer_dream_steps']:.1f} steps in its dream, {entry['ratio']:g} x its "
          f"{pacer['mean_steps']:.1f} in the game", flush=True)
    return dataclasses.replace(settings, done_threshold=entry["threshold"])


def _one_generation(state: dict, m: WorldModel, spec: ControllerSpec, settings: DreamSettings,
                    starts: torch.Tensor, c, evaluate_fn: EvaluateFn | None, m_id: str,
                    midway: MidwayStarts | None = None, n_midway: int = 0,
                    pool: DreamPool | None = None) -> dict:
    """Ask, dream, tell, maybe check the centre in the real game; updates ``state`` in place.

    ``m_id``: :func:`weights_fingerprint` of the M the real game's agent plays with; each check
    records it, and a check with a new M replaces the best one of an older M.  ``pool``: the
    processes that dream the generation (None: this one)."""
    es = state["es"]
    generation = state["generation"] + 1
    t0 = time.perf_counter()
    solutions = es.ask()
    candidates = np.vstack([np.asarray(solutions), es.mean[None, :]])  # last row: the centre
    seed = generation_seed(c.seed, generation)
    if pool is not None:
        fitness, mean_length, steps = pool.fitness(candidates, settings, c.rollouts, seed)
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        fitness, mean_length, steps = dream_fitness(m, candidates, spec, settings, starts, c.rollouts, generator,
                                                    midway, n_midway)
    es.tell(solutions, (-fitness[:-1]).tolist())
    pop, centre = fitness[:-1], float(fitness[-1])
    best_i = int(np.argmax(pop))
    if state["best_dream"] is None or pop[best_i] > state["best_dream"]["dream_score"]:
        state["best_dream"] = {"params": candidates[best_i].astype(np.float32), "generation": generation,
                               "dream_score": float(pop[best_i]), "real_score": None}
    dream_s = time.perf_counter() - t0
    real_mean = real_std = None
    if evaluate_fn is not None and c.eval_every > 0 and (generation % c.eval_every == 0
                                                          or generation == c.generations):
        scores = np.asarray(evaluate_fn(candidates[-1].copy(), c.eval_episodes, EVAL_SEED_BASE + c.seed),
                            dtype=np.float64)
        real_mean, real_std = float(scores.mean()), float(scores.std())
        # Every checked centre is kept: agents/select.py re-plays the best few on fresh episodes.
        check = {"params": candidates[-1].astype(np.float32), "generation": generation, "dream_score": centre,
                 "real_score": real_mean, "m": m_id}
        state.setdefault("checks", []).append(check)
        best = state["best_real"]
        if best is None or best.get("m") != m_id or real_mean > best["real_score"]:
            state["best_real"] = dict(check)
    wall = time.perf_counter() - t0
    state["generation"] = generation
    state["wall_s"] += wall
    record = {
        "generation": generation, "dream_mean": float(pop.mean()), "dream_best": float(pop[best_i]),
        "dream_std": float(pop.std()), "dream_worst": float(pop.min()), "centre_dream": centre,
        "sigma": float(es.sigma), "mean_length": mean_length, "dream_steps": steps,
        "dream_steps_per_s": steps / max(dream_s, 1e-9), "dream_workers": 1 if pool is None else pool.workers,
        "real_mean": real_mean, "real_std": real_std,
        "best_dream_ever": state["best_dream"]["dream_score"], "done_threshold": settings.done_threshold,
        "wall_s": wall, "time": time.time(),
    }
    state["history"].append(record)
    return record
