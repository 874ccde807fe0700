"""Train V on a run's frames, then encode every episode into latents for M.

``python run.py train-vae`` calls :func:`train_vae`.  What it leaves in the run folder:

- ``vae_ckpt.pt``  after each epoch: model, optimizer, epoch, torch and numpy RNG
  state; and every ``vae.checkpoint_every_s`` inside an epoch, with where the epoch
  stands (its batches done, the numpy RNG state it began with, its running loss sums).
  A rerun resumes from it, mid-epoch too, with the same batches as an unbroken run;
  with every epoch done (and ``vae.pt`` saved), the frames are not even loaded: only
  episodes without latents are encoded.
- ``vae.pt``       the final weights (:func:`worldmodel.vae.save_vae`).
- ``metrics/vae.jsonl``  one record per epoch: train_* and val_* recon / recon_raw /
  kl / kl_raw / loss (recon is weighted by colour when ``vae.colour_balance`` > 0;
  recon_raw never is), img_per_s (also TensorBoard under ``tb/`` when it is installed).
- ``plots/vae_recon_epoch{N}.png``  validation frames (top) over their
  reconstructions from mu (bottom).
- ``latents/ep_XXXXXX.npz``  per episode (same number as its episode file):
  ``mu`` float32 (T, Z), ``logvar`` float32 (T, Z), and ``action``, ``reward``,
  ``done``, ``terminated`` copied from the episode, so M never reopens frames.
  A file newer than ``vae.pt`` and its episode is kept; files of episodes that
  are gone (or skipped as unreadable) are removed.

Training uses ``vae.threads`` torch threads (default every core; on a machine
other jobs share, 1 is faster: docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from worldmodel.config import VAEConfig
from worldmodel.episodes import episode_index, episode_path, list_episodes, load_episode, save_episode
from worldmodel.errors import UserError
from worldmodel.frames import FrameSet, load_frames, subsample
from worldmodel.io import (
    append_jsonl,
    atomic_path,
    load_checkpoint,
    load_state_dict_checked,
    read_jsonl,
    save_checkpoint,
    write_text,
)
from worldmodel.latents import list_latents, split_episodes
from worldmodel.plots import plot_run
from worldmodel.runs import Run
from worldmodel.torch_utils import autocast, available_cores, resolve_device, resolve_precision
from worldmodel.vae import (
    COLOUR_LEVELS,
    FRAME_SHAPE,
    ConvVAE,
    colour_weights,
    encode_frames,
    load_vae,
    pixel_weights,
    preprocess,
    save_vae,
    vae_loss,
)

GRID_FRAMES = 8  # columns of the reconstruction plot
POSTFIX_EVERY_S = 0.5  # progress-bar refresh of the loss terms (each one reads the device)
TERMS = ("recon", "recon_raw", "kl", "kl_raw", "loss")
COLOUR_SAMPLE = 20_000  # frames whose pixels set the colour-balance weights
LATENT_COPY_KEYS = ("action", "reward", "done", "terminated")


def checkpoint_path(run: Run) -> Path:
    return run.dir / "vae_ckpt.pt"


def make_optimizer(vae: ConvVAE, lr: float) -> torch.optim.Adam:
    """Adam over V's parameters; the fused kernel where the device has one (about 5% faster on CPU)."""
    device = next(vae.parameters()).device
    return torch.optim.Adam(vae.parameters(), lr=lr, fused=device.type in ("cpu", "cuda") or None)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use ``n`` torch threads inside the block; the caller's setting comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------- data

def split_frames(frames: FrameSet, cfg: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) frame indices: split by episode, then ``max_frames`` subsamples both alike."""
    train_eps, val_eps = split_episodes(len(frames.episodes), cfg.val_fraction, cfg.seed)
    train, val = frames.frame_indices(train_eps), frames.frame_indices(val_eps)
    if cfg.max_frames is not None and len(train) > cfg.max_frames:
        fraction = cfg.max_frames / len(train)
        train, val = subsample(train, fraction, cfg.seed), subsample(val, fraction, cfg.seed + 1)
    return train, val


def _batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator, skip: int = 0) -> Iterator[np.ndarray]:
    """Random minibatches of ``indices``, after the first ``skip``; each sorted, so the memory map is
    read front to back."""
    order = rng.permutation(indices)
    for start in range(skip * batch_size, len(order), batch_size):
        yield np.sort(order[start:start + batch_size])


# ----------------------------------------------------------------- one epoch

def _train_epoch(vae: ConvVAE, opt: torch.optim.Optimizer, frames: FrameSet, train: np.ndarray,
                 cfg: VAEConfig, rng: np.random.Generator, device: torch.device,
                 epoch: int, progress: bool = True, precision: torch.dtype | None = None,
                 weights: torch.Tensor | None = None, partial: dict | None = None,
                 checkpoint: Callable[[dict], None] | None = None) -> dict[str, float]:
    """One pass over ``train`` in random minibatches; returns the mean loss terms and img/s.

    precision: bfloat16 runs the forward pass under autocast (``system.precision``); the
    loss, the gradients' accumulation and Adam stay float32.  weights: the colour-balance
    table (:func:`worldmodel.vae.colour_weights`) or None.  partial: where a checkpoint left
    this epoch (:func:`_partial`), to go on from; checkpoint(partial) is called every
    ``cfg.checkpoint_every_s`` with where it stands now.
    """
    vae.train()
    if partial is None:
        partial = {"epoch": epoch, "batches": 0, "seen": 0, "seconds": 0.0, "train_frames": len(train),
                   "numpy_rng": rng.bit_generator.state, "sums": {k: 0.0 for k in TERMS}}
    else:  # the permutation the epoch began with, then on past the batches done
        rng.bit_generator.state = partial["numpy_rng"]
    sums = {k: torch.tensor(float(partial["sums"][k]), device=device) for k in TERMS}
    seen, batches, last_postfix = int(partial["seen"]), int(partial["batches"]), 0.0
    start = last_checkpoint = time.perf_counter()

    def where() -> dict:
        return {**partial, "batches": batches, "seen": seen, "sums": {k: v.item() for k, v in sums.items()},
                "seconds": float(partial["seconds"]) + time.perf_counter() - start}

    with tqdm(total=len(train), initial=seen, unit="img", desc=f"vae epoch {epoch}/{cfg.epochs}",
              disable=not progress) as bar:
        for idx in _batches(train, cfg.batch_size, rng, skip=batches):
            raw = frames.frames[idx]
            x = preprocess(raw, device)
            with autocast(device, precision):
                recon, mu, logvar = vae(x)
            terms = vae_loss(x, recon.float(), mu.float(), logvar.float(), cfg.kl_tolerance, cfg.beta,
                             None if weights is None else pixel_weights(raw, weights))
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k in TERMS:
                sums[k] += terms[k].detach() * len(idx)
            seen += len(idx)
            batches += 1
            bar.update(len(idx))
            now = time.perf_counter()
            if now - last_postfix > POSTFIX_EVERY_S:
                last_postfix = now
                bar.set_postfix(recon=f"{terms['recon'].item():.1f}", kl=f"{terms['kl_raw'].item():.2f}")
            if checkpoint is not None and now - last_checkpoint >= cfg.checkpoint_every_s and seen < len(train):
                checkpoint(where())
                last_checkpoint = time.perf_counter()
    elapsed = where()["seconds"]
    out = {k: v.item() / max(seen, 1) for k, v in sums.items()}
    out["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    return out


@torch.no_grad()
def _evaluate(vae: ConvVAE, frames: FrameSet, indices: np.ndarray, cfg: VAEConfig,
              device: torch.device, weights: torch.Tensor | None = None) -> dict[str, float] | None:
    """Mean loss terms over ``indices`` (None when there are none)."""
    if len(indices) == 0:
        return None
    vae.eval()
    sums = {k: 0.0 for k in TERMS}
    for start in range(0, len(indices), cfg.batch_size):
        raw = frames.frames[indices[start:start + cfg.batch_size]]
        x = preprocess(raw, device)
        terms = vae_loss(x, *vae(x), cfg.kl_tolerance, cfg.beta,
                         None if weights is None else pixel_weights(raw, weights))
        for k in TERMS:
            sums[k] += terms[k].item() * len(raw)
    return {k: v / len(indices) for k, v in sums.items()}


@torch.no_grad()
def save_recon_grid(vae: ConvVAE, frames: np.ndarray, path: str | os.PathLike,
                    device: torch.device) -> None:
    """PNG of frames (top row) over their reconstructions from mu (bottom row).  frames: (K, 64, 64, 3)."""
    vae.eval()
    mu, _ = vae.encode(preprocess(frames, device))
    recon = vae.decode(mu).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    grid = np.concatenate([np.concatenate(list(frames), axis=1), np.concatenate(list(recon), axis=1)])
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _grid_frames(frames: FrameSet, val: np.ndarray, train: np.ndarray) -> np.ndarray:
    """GRID_FRAMES frames spread over the validation set (the training set when it is empty)."""
    pool = val if len(val) else train
    picks = np.unique(np.linspace(0, len(pool) - 1, GRID_FRAMES).astype(np.int64))
    return np.asarray(frames.frames[pool[picks]])


# ----------------------------------------------------------------- checkpoint and metrics

def _save_state(path: Path, vae: ConvVAE, opt: torch.optim.Optimizer, epoch: int,
                rng: np.random.Generator, partial: dict | None = None) -> None:
    """``epoch``: the last finished epoch; ``partial``: how far the next one got (None at an epoch's end)."""
    save_checkpoint(path, {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": rng.bit_generator.state,
        **({"partial": partial} if partial is not None else {}),
    })


def _partial(path: Path, ckpt: dict) -> dict | None:
    """Where checkpoint ``ckpt`` (read from ``path``) left an unfinished epoch (None: at an epoch's end)."""
    partial = ckpt.get("partial")
    needed = {"epoch", "batches", "seen", "seconds", "numpy_rng", "sums"}
    if partial is not None and not (isinstance(partial, dict) and needed <= set(partial)
                                    and set(TERMS) <= set(partial["sums"])):
        raise UserError(f"{path}: its unfinished epoch's record lacks {', '.join(sorted(needed))}; "
                        "delete it to restart")
    return partial


def _resume(path: Path, vae: ConvVAE, opt: torch.optim.Optimizer, rng: np.random.Generator,
            lr: float) -> tuple[int, dict | None]:
    """Load the training state saved at ``path``; returns the last finished epoch (0 when none)
    and where the next one stands when the checkpoint was taken inside it (:func:`_partial`)."""
    if not path.exists():
        return 0, None
    ckpt = load_checkpoint(path)
    missing = [k for k in ("epoch", "model", "optimizer", "torch_rng", "cuda_rng", "numpy_rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a V training checkpoint (lacks {', '.join(missing)}); delete it to restart")
    load_state_dict_checked(vae, ckpt["model"], path)
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:
        group["lr"] = lr  # a --set vae.lr=... on the rerun wins over the stored one
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    rng.bit_generator.state = ckpt["numpy_rng"]
    return int(ckpt["epoch"]), _partial(path, ckpt)


def _trim_metrics(path: Path, last_epoch: int) -> list[dict]:
    """Drop records of epochs after the checkpoint (a kill between metrics and checkpoint)."""
    records = read_jsonl(path)
    keep = [r for r in records if r.get("epoch", 0) <= last_epoch]
    if path.exists() and len(keep) != len(path.read_text().splitlines()):
        write_text(path, "".join(_json_line(r) for r in keep))
    return keep


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def _tensorboard(run: Run) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(run.dir / "tb"))


def _epoch_record(epoch: int, train: dict, val: dict | None, n_train: int, n_val: int,
                  seconds: float) -> dict:
    record: dict[str, Any] = {"epoch": epoch, "img_per_s": train["img_per_s"],
                              "train_frames": n_train, "val_frames": n_val, "time_s": seconds}
    for k in TERMS:
        record[f"train_{k}"] = train[k]
        record[f"val_{k}"] = val[k] if val is not None else None
    return record


# ----------------------------------------------------------------- latents

def encode_latents(run: Run, vae: ConvVAE, episodes: Sequence[Path], frames_of: Callable[[int], np.ndarray],
                   batch_size: int, device: torch.device, progress: bool = True) -> tuple[int, int]:
    """Write ``latents/ep_XXXXXX.npz`` for every episode; returns (written, kept).

    ``frames_of(i)``: the uint8 frames (T, 64, 64, 3) of ``episodes[i]``, read only when
    needed.  A latents file newer than both ``vae.pt`` and its episode file is kept.
    """
    vae.eval()
    vae_mtime = run.vae_path.stat().st_mtime_ns
    written = kept = 0
    for i, ep in enumerate(tqdm(episodes, unit="ep", desc="encode latents", disable=not progress)):
        out = episode_path(run.latents_dir, episode_index(ep))
        if out.exists() and out.stat().st_mtime_ns > max(vae_mtime, ep.stat().st_mtime_ns):
            kept += 1
            continue
        frames = frames_of(i)
        if len(frames) == 0:
            continue  # an empty episode has no step for M to learn from
        copied = load_episode(ep, keys=LATENT_COPY_KEYS)
        mu, logvar = encode_frames(vae, frames, batch_size, device)
        save_episode(out, {"mu": mu, "logvar": logvar, **copied})
        written += 1
    return written, kept


def encode_new_episodes(run: Run, skip_bad: bool = False, progress: bool = True) -> dict:
    """Encode, with the run's saved V, the episodes that have no up-to-date latents file.

    Reads frames straight from the episode files, so adding a few episodes (``iterate``)
    does not rebuild the frame cache of all of them.  Returns frames, skipped_episodes,
    latents_written, latents_kept, latents_removed.
    """
    device = resolve_device(run.cfg.system.device)
    vae = load_vae(run.vae_path, run.cfg.vae.z_dim, device)
    episodes, skipped = list_episodes(run.episodes_dir), []

    def frames_of(i: int) -> np.ndarray:
        try:
            return load_episode(episodes[i], keys=("obs",))["obs"]
        except UserError as exc:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {exc}", stacklevel=2)
            skipped.append(episodes[i])
            return np.zeros((0, *FRAME_SHAPE), np.uint8)

    with _threads(run.cfg.vae.threads or available_cores()):
        written, kept = encode_latents(run, vae, episodes, frames_of, run.cfg.vae.batch_size, device, progress)
    used = [p for p in episodes if p not in skipped]
    removed = remove_orphan_latents(run, used)
    frames = sum(len(load_episode(p, keys=("done",))["done"]) for p in used)
    return {"frames": int(frames),
            "skipped_episodes": len(skipped), "latents_written": written, "latents_kept": kept,
            "latents_removed": removed}


def remove_orphan_latents(run: Run, episodes: Sequence[Path]) -> int:
    """Delete latent files whose episode is not in ``episodes`` (gone, or skipped as unreadable)."""
    current = {ep.name for ep in episodes}
    orphans = [p for p in list_latents(run.latents_dir) if p.name not in current]
    for p in orphans:
        p.unlink()
    return len(orphans)


# ----------------------------------------------------------------- the command

def train_vae(run: Run, skip_bad: bool = False, progress: bool = True) -> dict:
    """Train V on the run's frames (resuming from ``vae_ckpt.pt``), save ``vae.pt``, encode latents.

    Returns a summary: epochs, epochs_trained, val_loss (last epoch; None without
    validation episodes), frames, train_frames, val_frames, skipped_episodes,
    latents_written, latents_kept, latents_removed (files of episodes now gone or skipped).
    """
    cfg = run.cfg.vae
    if run.vae_path.exists() and _epochs_done(checkpoint_path(run)) >= cfg.epochs:
        # V is trained: new episodes (from ``iterate``) only need latents, not a frame cache of all.
        records = read_jsonl(run.metrics_path("vae"))
        return {"epochs": cfg.epochs, "epochs_trained": 0,
                "val_loss": records[-1].get("val_loss") if records else None,
                **encode_new_episodes(run, skip_bad, progress)}
    with _threads(cfg.threads or available_cores()):
        return _train_vae(run, skip_bad, progress)


def _epochs_done(path: Path) -> int:
    if not path.exists():
        return 0
    ckpt = load_checkpoint(path)
    return int(ckpt["epoch"]) if isinstance(ckpt, dict) and "epoch" in ckpt else 0


def balance_table(frames: FrameSet, train: np.ndarray, cfg: VAEConfig,
                  device: torch.device) -> torch.Tensor | None:
    """The colour-balance weights (``vae.colour_balance`` > 0) from up to COLOUR_SAMPLE training frames.

    The sample depends only on the split and ``vae.seed``, so a resumed run gets the same table.
    """
    if cfg.colour_balance <= 0 or len(train) == 0:
        return None
    sample = np.random.default_rng([cfg.seed, COLOUR_LEVELS]).choice(
        train, size=min(len(train), COLOUR_SAMPLE), replace=False)
    table = colour_weights(np.asarray(frames.frames[np.sort(sample)]), cfg.colour_balance, cfg.colour_weight_max)
    return torch.from_numpy(table).to(device)


def _train_vae(run: Run, skip_bad: bool, progress: bool) -> dict:
    cfg = run.cfg.vae
    device = resolve_device(run.cfg.system.device)
    precision = resolve_precision(run.cfg.system.precision, device)
    frames = load_frames(run, skip_bad=skip_bad)
    train, val = split_frames(frames, cfg)
    if len(train) == 0:
        raise UserError(f"{run.episodes_dir}: the training episodes hold no frames")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = ConvVAE.from_config(run.cfg).to(device)
    opt = make_optimizer(vae, cfg.lr)
    ckpt_path = checkpoint_path(run)
    done, partial = _resume(ckpt_path, vae, opt, rng, cfg.lr)
    partial = partial if done < cfg.epochs else None  # (vae.epochs lowered since: nothing left to resume)
    metrics_path = run.metrics_path("vae")
    records = _trim_metrics(metrics_path, done)

    writer = _tensorboard(run) if done < cfg.epochs else None
    grid = _grid_frames(frames, val, train)
    weights = balance_table(frames, train, cfg, device) if done < cfg.epochs else None
    if partial is not None and (partial["epoch"] != done + 1 or partial.get("train_frames") != len(train)):
        print(f"{ckpt_path}: its unfinished epoch had other training frames ({partial.get('train_frames')}, "
              f"now {len(train)}): epoch {done + 1} starts over from the checkpoint's weights", flush=True)
        partial = None
    if partial is not None:
        print(f"resuming V training from {ckpt_path}: epoch {partial['epoch']} at "
              f"{partial['seen']}/{len(train)} frames", flush=True)

    def checkpoint(where: dict) -> None:
        _save_state(ckpt_path, vae, opt, where["epoch"] - 1, rng, where)

    trained = 0
    for epoch in range(done + 1, cfg.epochs + 1):
        start = time.perf_counter()
        before = partial["seconds"] if partial is not None else 0.0
        train_terms = _train_epoch(vae, opt, frames, train, cfg, rng, device, epoch, progress, precision,
                                   weights, partial, checkpoint)
        partial = None
        val_terms = _evaluate(vae, frames, val, cfg, device, weights)
        record = _epoch_record(epoch, train_terms, val_terms, len(train), len(val),
                               before + time.perf_counter() - start)
        save_recon_grid(vae, grid, run.dir / "plots" / f"vae_recon_epoch{epoch}.png", device)
        _append(metrics_path, record, writer)  # before the checkpoint: a rerun trims an orphan line
        _save_state(ckpt_path, vae, opt, epoch, rng)
        records.append(record)
        trained += 1
    if writer is not None:
        writer.close()

    if trained or not run.vae_path.exists():
        save_vae(run.vae_path, vae)
    written, kept = encode_latents(run, vae, frames.episodes, frames.episode_frames, cfg.batch_size, device,
                                   progress)
    removed = remove_orphan_latents(run, frames.episodes)
    plot_run(run, stages=("vae",))
    return {
        "epochs": cfg.epochs,
        "epochs_trained": trained,
        "val_loss": records[-1].get("val_loss") if records else None,
        "frames": len(frames),
        "train_frames": int(len(train)),
        "val_frames": int(len(val)),
        "skipped_episodes": len(frames.skipped),
        "latents_written": written,
        "latents_kept": kept,
        "latents_removed": removed,
    }


def _append(path: Path, record: dict, writer: Any) -> None:
    append_jsonl(path, record)
    if writer is not None:
        for key, value in record.items():
            if key != "epoch" and value is not None:
                writer.add_scalar(f"vae/{key}", value, record["epoch"])
        writer.flush()
