"""One folder per run: the resolved config and everything the run makes.

Layout (each file written atomically)::

    runs/<name>/
      config.yaml            resolved config
      episodes/              ep_000000.npz ... + manifest.json   (collect)
      latents/               ep_000000.npz (mu, logvar per step)  (train-vae)
      vae.pt  vae_ckpt.pt    V weights; V training state           (train-vae)
      m.pt    m_ckpt.pt      M weights; M training state           (train-rnn)
      controller.pt cmaes.pkl  best controller; CMA-ES state       (dream)
      metrics/<stage>.jsonl  one JSON record per line
      plots/ videos/ eval.json
      evals/<what changed>.json  evaluations under other settings (--set, --episodes)

Running a command again on the same folder continues it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodel import config as config_lib
from worldmodel.config import Config
from worldmodel.errors import UserError
from worldmodel.io import write_json, write_text


@dataclass(frozen=True)
class Run:
    dir: Path
    cfg: Config

    @property
    def episodes_dir(self) -> Path:
        return self.dir / "episodes"

    @property
    def latents_dir(self) -> Path:
        return self.dir / "latents"

    @property
    def vae_path(self) -> Path:
        return self.dir / "vae.pt"

    @property
    def m_path(self) -> Path:
        return self.dir / "m.pt"

    def member_path(self, k: int) -> Path:
        """M number k of an ensemble (``model.ensemble``): m.pt, then m1.pt, m2.pt, ...; the hazard
        critic (``model.hazard_horizon``) is the file after the ensemble's."""
        return self.m_path if k == 0 else self.dir / f"m{k}.pt"

    @property
    def m_files(self) -> int:
        """How many M files the run trains: the ensemble's members, then the hazard critic if any."""
        return self.cfg.model.ensemble + (1 if self.cfg.model.hazard_horizon else 0)

    @property
    def controller_path(self) -> Path:
        return self.dir / "controller.pt"

    @property
    def committee_path(self) -> Path:
        """select's committee (``controller.committee``; agents/agent.py): controllers and their M's."""
        return self.dir / "committee.pt"

    def m_snapshot_path(self, m_id: str, member: int = 0) -> Path:
        """Where the M with fingerprint ``m_id`` is kept (agents/cmaes.py, ``keep_m_snapshot``):
        ``m_history/<m_id>.pt``; an ensemble's other members beside it (``<m_id>.m1.pt`` ...)."""
        return self.dir / "m_history" / (f"{m_id}.pt" if member == 0 else f"{m_id}.m{member}.pt")

    @property
    def m_history_index(self) -> Path:
        """The fingerprints of the M's snapshotted in ``m_history/``, oldest first (``keep_m_snapshot``)."""
        return self.dir / "m_history" / "index.json"

    def m_snapshot_ids(self) -> list[str]:
        """``m_history/index.json``'s fingerprints, oldest first; [] where there is none."""
        path = self.m_history_index
        if not path.exists():
            return []
        try:
            ids = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not readable as JSON ({e})") from None
        if not (isinstance(ids, list) and all(isinstance(i, str) and i.isalnum() for i in ids)):
            raise UserError(f"{path}: not a list of M fingerprints")
        return ids

    def record_m_snapshot(self, m_id: str) -> None:
        """Add ``m_id`` to ``m_history/index.json`` as the newest (once)."""
        ids = self.m_snapshot_ids()
        if m_id not in ids:
            write_json(self.m_history_index, [*ids, m_id])

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for one command: two commands writing one run would corrupt it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise UserError(f"run {self.dir} is in use by {holder}; wait for it or use another --run") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)

    def metrics_path(self, stage: str) -> Path:
        (self.dir / "metrics").mkdir(parents=True, exist_ok=True)
        return self.dir / "metrics" / f"{stage}.jsonl"


def _check_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--run {path}: exists and is not a folder")


def _stored_config(run_path: Path) -> Config | None:
    """The config a run folder was made with, or None for a new run."""
    _check_dir(run_path)
    path = run_path / "config.yaml"
    if not path.exists():
        return None
    return config_lib.from_dict(config_lib.load_yaml(path), source=str(path))


def open_run(run_dir: str | os.PathLike | None, config_path: str | os.PathLike | None,
             overrides: list[str] | None = None, create: bool = True) -> Run:
    """Resolve the config of a run and make sure its folder exists.

    A new run takes its config from ``config_path`` (default ``configs/smoke.yaml``
    is not assumed: one of the two must exist).  An existing run keeps the config
    stored in it; ``--set`` overrides are applied, and recorded in its config.yaml
    when ``create`` (the commands that train); with ``create=False`` they hold for
    this command only and nothing is written.  Passing a ``--config`` that differs
    from the stored one is an error, so a rerun never silently retrains a run under
    other settings.
    """
    overrides = overrides or []
    stored_cfg = None
    if run_dir is not None:
        run_path = Path(run_dir)
        stored_cfg = _stored_config(run_path)
    if config_path is None and stored_cfg is None:
        where = f"run folder {run_dir} has no config.yaml" if run_dir else "no --run given"
        raise UserError(f"--config is required ({where})")

    if config_path is not None:
        cfg = config_lib.load(config_path)
        if run_dir is None:
            run_path = Path("runs") / cfg.name
            stored_cfg = _stored_config(run_path)
        if stored_cfg is not None:
            cfg = config_lib.from_dict({"name": stored_cfg.name}, base=cfg)
            # Fields given with --set may differ: rerunning the command that made the run resumes it.
            overridden = {config_lib.parse_override(text)[0] for text in overrides}
            changed = set(config_lib.diff(stored_cfg, cfg)) - overridden
            if changed:
                keys = ", ".join(sorted(changed)[:5])
                raise UserError(
                    f"{run_path}/config.yaml differs from {config_path} ({keys}); "
                    "use --set to change a field of this run, or another --run"
                )
    else:
        cfg = stored_cfg

    cfg = config_lib.apply_overrides(cfg, overrides)
    if create:
        run_path.mkdir(parents=True, exist_ok=True)
        if stored_cfg is None or config_lib.diff(stored_cfg, cfg):
            write_text(run_path / "config.yaml", config_lib.dump(cfg))
    return Run(dir=run_path, cfg=cfg)


def unrecorded_changes(run: Run) -> dict[str, tuple[Any, Any]]:
    """Fields where ``run.cfg`` (with this command's ``--set``) differs from the config stored in
    the run folder: {key: (stored, now)}; empty for a run without a stored config."""
    stored = _stored_config(run.dir)
    return config_lib.diff(stored, run.cfg) if stored is not None else {}
