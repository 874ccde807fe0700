"""Training a run's M files: side by side in one-thread processes (ours) against one after another.

A run trains several M's on the same latents: the ensemble's members and the hazard
critic (four LSTM-512 M's in configs/takecover-cpu.yaml).  Each member's step is an
LSTM of small matrix products that a second thread speeds up by only ~1.4x, so
``train_m`` puts one member on each core (``model.workers``, default one per core).
The baseline is what ``model.workers: 1`` does: the members one after another in this
process with every thread.  Both run in this process on the same latents, with the
same config but for ``model.workers``; the script reports both wall times, the ratio,
and whether the two made the same weights.

    python benchmarks/m_members.py                      # synthetic latents, the preset's sizes
    python benchmarks/m_members.py --run runs/s3z4 [--episodes 800] [--epochs 1]

With ``--run``, the run's latents and V (symbolic links, nothing in the run is written)
and its config; without, ``--episodes`` synthetic episodes of 300 steps under
``--config`` (default configs/takecover-cpu.yaml).

Results: docs/benchmarks.md, "Training the M files".
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worldmodel import config as config_lib
from worldmodel.io import save_checkpoint
from worldmodel.latents import list_latents
from worldmodel.runs import Run, open_run
from worldmodel.torch_utils import available_cores
from worldmodel.train_m import member_processes, train_m

ROOT = Path(__file__).resolve().parents[1]

PRESET = ROOT / "configs" / "takecover-cpu.yaml"


def synthetic_latents(folder: Path, episodes: int, steps: int | np.ndarray, z_dim: int, seed: int = 0) -> None:
    """Episodes of random z and held actions, each ending in a death; ``steps`` long, or
    ``steps[i]`` for episode i."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lengths = np.broadcast_to(steps, (episodes,))
    for i in range(episodes):
        n = int(lengths[i])
        done = np.zeros(n, dtype=bool)
        done[-1] = True
        np.savez(folder / f"ep_{i:06d}.npz", mu=rng.standard_normal((n, z_dim)).astype(np.float32),
                 logvar=np.full((n, z_dim), -2.0, np.float32),
                 action=np.repeat(rng.uniform(-1, 1, (n // 8 + 1, 1)), 8, axis=0)[:n].astype(np.float32),
                 reward=np.ones(n, np.float32), done=done, terminated=done.copy())


def prepare(folder: Path, config: Path, overrides: list[str], source: Path | None, episodes: int,
            z_dim: int) -> Run:
    run = open_run(folder, config, overrides)
    if source is None:
        synthetic_latents(run.latents_dir, episodes, 300, z_dim)
        save_checkpoint(run.vae_path, {"z_dim": z_dim, "state_dict": {}})
    else:
        run.latents_dir.mkdir()
        for path in list_latents(source / "latents")[:episodes]:
            (run.latents_dir / path.name).symlink_to(path.resolve())
        os.symlink((source / "vae.pt").resolve(), run.vae_path)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run with latents/ and vae.pt (default: synthetic latents)")
    parser.add_argument("--config", type=Path, default=PRESET, help="without --run: the config (default: the preset)")
    parser.add_argument("--episodes", type=int, default=400, help="latent files to train on")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    config = args.run / "config.yaml" if args.run else args.config
    z_dim = config_lib.load(config).vae.z_dim
    common = [f"model.epochs={args.epochs}", "system.device=cpu"]
    times, weights = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers in (("one after another (model.workers: 1)", "1"), ("side by side (ours)", "null")):
            run = prepare(Path(tmp) / workers, config, [*common, f"model.workers={workers}"], args.run,
                          args.episodes, z_dim)
            processes = member_processes(run.cfg, torch.device("cpu"), run.m_files)
            start = time.perf_counter()
            train_m(run)
            times[label] = time.perf_counter() - start
            weights[label] = [torch.load(run.member_path(k), weights_only=True)["state_dict"]
                              for k in range(run.m_files)]
            print(f"{label}: {run.m_files} M's in {processes} process(es), {times[label]:.1f} s", flush=True)
    base, ours = times.values()
    a, b = weights.values()
    same = all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    print(f"torch {torch.__version__}, {available_cores()} cores, {platform.processor() or platform.machine()}; "
          f"{args.episodes} episodes, {args.epochs} epoch(s)")
    print(f"side by side / one after another: {base / ours:.2f}x faster; same weights: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
