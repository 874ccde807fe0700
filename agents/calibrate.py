"""Calibrate the dream's harshness on a policy that needs no training: TakeCover's blind pacer.

``cmaes.done_threshold`` ends a dream where M's P(done) passes it, but what a threshold means
depends on the M: the same 0.1 let the pacer live 98 dream steps in one run's M's and 286 in
another's, while the game gives it about 185 (docs/results.md, "A dream calibrated on the blind
pacer").  With ``cmaes.done_calibration`` = r > 0, each search instead ends its dreams at the
threshold under which the pacer lives r times as long in that M's dream as in the real game:

1. the real pacer (``cmaes.calibration_pacer_steps`` a leg) plays ``cmaes.calibration_episodes``
   episodes on seeds 5,000,000 + ``cmaes.seed`` … (apart from collection, checks, ``select`` and
   evaluation), once per run;
2. in each new M, as many pacer dreams run to ``cmaes.max_steps`` with no end, recording the
   dream's P(done) at every step (the same draws whatever the threshold, so a dream's life under
   threshold θ is the first step where P(done) passes θ: one pass serves every θ);
3. the threshold is the smallest θ whose mean life reaches r × the real mean, by bisection.

Both are kept in the run's ``calibration.json`` (the threshold under the M's weights
fingerprint), so a resumed search and ``evaluate``'s dream score use the same one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from agents.controller import ControllerSpec
from agents.policies import PacingPolicy
from envs.dream import DreamSettings, blind_policy, dream_rollouts, sample_start_z
from worldmodel.errors import UserError
from worldmodel.io import write_json
from worldmodel.runs import Run

CALIBRATION_FILE = "calibration.json"
CALIBRATION_SEED_BASE = 5_000_000
_BISECTION_STEPS = 40


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({type(exc).__name__}); delete it to calibrate again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a calibration file; delete it to calibrate again")
    return data


def real_pacer(run: Run, workers: int | None = None, backend: str | None = None) -> dict:
    """The blind pacer's real episodes for the calibration (cached in ``calibration.json``):
    {"seeds": [first, last], "pacer_steps", "mean_steps", "mean_return"}."""
    from agents.evaluate import play_many

    cfg, path = run.cfg, run.path(CALIBRATION_FILE)
    first = CALIBRATION_SEED_BASE + cfg.cmaes.seed
    seeds = list(range(first, first + cfg.cmaes.calibration_episodes))
    want = {"seeds": [seeds[0], seeds[-1]], "pacer_steps": cfg.cmaes.calibration_pacer_steps,
            "frame_skip": cfg.env.frame_skip, "max_steps": cfg.env.max_steps}
    data = _load(path)
    cached = data.get("pacer")
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in want.items()):
        return cached
    legs = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, pacer_steps=want["pacer_steps"]))
    episodes = play_many(Run(dir=run.dir, cfg=legs), "pacing", seeds, None, workers, backend,
                         desc="blind pacer (calibration)")
    pacer = {**want, "mean_steps": float(np.mean([e["steps"] for e in episodes])),
             "mean_return": float(np.mean([e["return"] for e in episodes]))}
    data["pacer"] = pacer
    write_json(path, data)
    return pacer


def pacer_done_trace(m, settings: DreamSettings, starts: torch.Tensor, dreams: int, seed: int,
                     pacer_steps: int) -> np.ndarray:
    """P(done) of ``dreams`` pacer dreams at every step up to ``settings.max_steps``, none ended:
    (T, dreams) float32.  Start z and M's noise come from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    device = starts.device
    z0 = sample_start_z(starts, dreams, generator).to(device)
    endless = dataclasses.replace(settings, done="threshold", done_threshold=2.0)  # P(done) never passes 2
    trace: list[torch.Tensor] = []
    spec = ControllerSpec.for_env("takecover", m.feature_dim(settings.features))
    dream_rollouts(m, torch.zeros(dreams, 0, device=device), spec, z0, endless, generator,
                   policy=blind_policy(PacingPolicy(pacer_steps).action_at), done_trace=trace)
    return torch.stack(trace).numpy()


def lifetimes(trace: np.ndarray, threshold: float) -> np.ndarray:
    """Each dream's length (steps) had it ended where P(done) first passed ``threshold``:
    (dreams,) int64, at most T (the trace's length, the dream's step cap)."""
    crossed = trace > threshold
    return np.where(crossed.any(0), crossed.argmax(0) + 1, trace.shape[0]).astype(np.int64)


def fit_threshold(trace: np.ndarray, target_steps: float) -> float:
    """The smallest threshold whose mean life reaches ``target_steps`` (1.0 when none does:
    then only a sure death ends a dream).  The mean life never falls as the threshold rises."""
    if lifetimes(trace, 1.0).mean() < target_steps:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if lifetimes(trace, mid).mean() < target_steps else (low, mid)
    return high


def calibrated_threshold(run: Run, m, m_id: str, starts: torch.Tensor, pacer: dict) -> dict:
    """The done threshold of the M with fingerprint ``m_id`` (cached in ``calibration.json``):
    {"threshold", "target_steps", "pacer_dream_steps", "ratio", "dreams"}."""
    c, path = run.cfg.cmaes, run.path(CALIBRATION_FILE)
    settings = DreamSettings.from_config(run.cfg)
    want = {"ratio": c.done_calibration, "dreams": c.calibration_episodes, "seed": CALIBRATION_SEED_BASE + c.seed,
            "target_steps": min(c.done_calibration * pacer["mean_steps"], float(settings.max_steps)),
            "temperature": settings.temperature, "max_steps": settings.max_steps}
    data = _load(path)
    cached = data.get("thresholds", {}).get(m_id)
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in want.items()):
        return cached
    trace = pacer_done_trace(m, settings, starts, want["dreams"], want["seed"], c.calibration_pacer_steps)
    threshold = fit_threshold(trace, want["target_steps"])
    entry = {**want, "threshold": threshold, "pacer_dream_steps": float(lifetimes(trace, threshold).mean())}
    data.setdefault("thresholds", {})[m_id] = entry
    write_json(path, data)
    return entry


def dream_threshold(run: Run, m_id: str) -> float | None:
    """The calibrated done threshold recorded for the M with fingerprint ``m_id``, or None."""
    if run.cfg.cmaes.done_calibration <= 0:
        return None
    entry = _load(run.path(CALIBRATION_FILE)).get("thresholds", {}).get(m_id)
    return float(entry["threshold"]) if isinstance(entry, dict) and "threshold" in entry else None
