"""`python run.py export`: a trained agent as a small, self-contained run folder.

The folder holds what `evaluate` and `watch` need and nothing that can run code:
the resolved config, V and M weights in float16, the controller, and a few
episodes with their latents (dream starts and the side-by-side video).  No
optimizer state, no CMA-ES pickle.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from worldmodel import config as config_lib
from worldmodel.episodes import episode_index, list_episodes
from worldmodel.errors import UserError
from worldmodel.io import load_checkpoint, save_checkpoint, write_json, write_text
from worldmodel.runs import Run


def _half(obj):
    """Float tensors to float16, everything else as it is (recursively)."""
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(torch.float16)
    if isinstance(obj, dict):
        return {k: _half(v) for k, v in obj.items()}
    return obj


def _calibrated_config(run: Run) -> config_lib.Config:
    """The run's config with the done threshold calibrated for its M (``cmaes.done_calibration``)
    written in as ``cmaes.done_threshold`` (float16 weights have another fingerprint, and the
    folder has no real pacer to calibrate on), so its dream scores stay those of the search."""
    cfg = run.cfg
    from agents.calibrate import dream_threshold
    from agents.cmaes import weights_fingerprint
    from envs.dream import load_world_model

    threshold = dream_threshold(run, weights_fingerprint(load_world_model(run, "cpu")))
    if threshold is None:
        raise UserError(f"{run.dir}: cmaes.done_calibration is on but calibration.json has no threshold for "
                        "its M; run `python run.py dream` first")
    return dataclasses.replace(cfg, cmaes=dataclasses.replace(cfg.cmaes, done_threshold=threshold,
                                                              done_calibration=0.0))


def export_run(run: Run, out: str | Path, episodes: int = 2) -> dict:
    """Copy the trained agent of ``run`` into ``out`` (which must not hold another agent)."""
    out = Path(out)
    members = [run.member_path(k) for k in range(run.m_files)]  # watch dreams with all
    needed = [run.vae_path, *members, run.controller_path]
    for path in needed:
        if not path.exists():
            raise UserError(f"{path}: not found; train the run before exporting it")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder is not empty; export into a new folder")
    latents = sorted(list_episodes(run.latents_dir), key=lambda p: p.stat().st_size)[:episodes]
    if not latents:
        raise UserError(f"{run.latents_dir}: no latents; run `python run.py train-vae` first")
    calibrated = _calibrated_config(run) if run.cfg.cmaes.done_calibration > 0 else None  # may refuse: before mkdir
    (out / "episodes").mkdir(parents=True)
    (out / "latents").mkdir()
    if calibrated is not None:
        write_text(out / "config.yaml", config_lib.dump(calibrated))
    else:
        shutil.copyfile(run.path("config.yaml"), out / "config.yaml")
    for path in (run.vae_path, *members):
        save_checkpoint(out / path.name, _half(load_checkpoint(path)))
    shutil.copyfile(run.controller_path, out / run.controller_path.name)
    if run.committee_path.exists():  # select's committee, with the M's its other controllers play with
        data = load_checkpoint(run.committee_path)
        m_ids = data.get("m") if isinstance(data, dict) else None
        if not (isinstance(m_ids, list) and all(isinstance(m, str) for m in m_ids)):
            raise UserError(f"{run.committee_path}: not a committee file (no list 'm' of M fingerprints)")
        for m_id in sorted(set(m_ids[1:]) - {m_ids[0]}):
            target = out / run.m_snapshot_path(m_id).relative_to(run.dir)
            target.parent.mkdir(exist_ok=True)
            save_checkpoint(target, _half(load_checkpoint(run.m_snapshot_path(m_id))))
        shutil.copyfile(run.committee_path, out / run.committee_path.name)
    if run.cfg.controller.shield > 0 and run.cfg.controller.shield_critics > 1:  # the shield's other critics
        from agents.agent import agent_critic_paths

        others = agent_critic_paths(run)[1:]
        for path in others:
            save_checkpoint(out / path.relative_to(run.dir), _half(load_checkpoint(path)))
        if others:  # oldest first, as the run's; the copy's own M has another fingerprint (float16)
            write_json(out / "m_history" / "index.json", [p.name.split(".")[0] for p in reversed(others)])
    for path in latents:
        shutil.copyfile(path, out / "latents" / path.name)
        episode = run.episodes_dir / path.name
        if episode.exists():
            shutil.copyfile(episode, out / "episodes" / path.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "episodes": [episode_index(p) for p in latents], "megabytes": size / 2**20}
