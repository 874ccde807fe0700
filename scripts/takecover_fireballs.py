"""How many of the fireballs in TakeCover frames does V keep?

    python scripts/takecover_fireballs.py --run runs/tb [--vae runs/tc9/vae.pt ...] [--frames 4000]

Takes up to ``--frames`` frames from the run's validation episodes (the split V was trained
without: the episodes no newer than the run's ``vae.pt``, split as ``train-vae`` split them, so
episodes that ``iterate`` added later change nothing), reconstructs each from its mean z with every V given (default: the run's own
``vae.pt``) and counts the fireball pixels that survive.  A fireball pixel is bright yellow:
red > 180 and green > 150 (the imps' fireballs are the only such thing in the room); it
survives when the reconstruction there is still red > 150 and green > 120.  Frames are
grouped by how many fireball pixels they hold (a distant fireball is 1-10 pixels of a
64×64 frame); each group reports its frames, the share of fireball pixels kept and the
share of frames with any kept.  Results: docs/results.md, "Run tb".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKETS = ((1, 10), (10, 30), (30, 100), (100, 400), (400, 64 * 64 + 1))


def fireball_mask(frames: np.ndarray, red: int = 180, green: int = 150) -> np.ndarray:
    """uint8 (N, H, W, 3) -> bool (N, H, W): the bright-yellow pixels."""
    return (frames[..., 0] > red) & (frames[..., 1] > green)


def fireball_recall(frames: np.ndarray, recon: np.ndarray) -> dict[str, tuple[int, float, float]]:
    """Per bucket of fireball pixels per frame: (frames, share of those pixels kept, share of frames with any kept).

    frames, recon: uint8 (N, 64, 64, 3).  Buckets without frames are left out.
    """
    mask = fireball_mask(frames)
    kept = mask & fireball_mask(recon, red=150, green=120)
    n = mask.reshape(len(frames), -1).sum(1)
    k = kept.reshape(len(frames), -1).sum(1)
    out = {}
    for lo, hi in BUCKETS:
        sel = (n >= lo) & (n < hi)
        if sel.any():
            out[f"{lo}-{hi - 1}"] = (int(sel.sum()), float(k[sel].sum() / n[sel].sum()), float((k[sel] > 0).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--vae", nargs="*", default=None, help="V weights to compare (default: the run's vae.pt)")
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from agents.watch import decode
    from worldmodel.episodes import list_episodes, load_episode
    from worldmodel.errors import UserError
    from worldmodel.latents import split_episodes
    from worldmodel.runs import open_run
    from worldmodel.vae import encode_frames, load_vae

    try:
        run = open_run(args.run, None, create=False)
        if args.frames < 1:
            raise UserError("--frames must be at least 1")
        episodes = list_episodes(run.episodes_dir)
        if run.vae_path.exists():
            trained_at = run.vae_path.stat().st_mtime_ns
            episodes = [p for p in episodes if p.stat().st_mtime_ns <= trained_at]
        if not episodes:
            raise UserError(f"{run.episodes_dir}: no episodes")
        _, val = split_episodes(len(episodes), run.cfg.vae.val_fraction, run.cfg.vae.seed)
        pool = np.concatenate([load_episode(episodes[i], keys=("obs",))["obs"] for i in (val if len(val) else [0])])
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(pool))[:args.frames])
        frames = pool[pick]
        print(f"{len(frames)} frames of {len(val)} validation episodes (of {len(episodes)}); per group of fireball pixels per frame: "
              "frames, share of fireball pixels kept, share of frames with any kept", flush=True)
        for path in args.vae or [run.vae_path]:
            vae = load_vae(path, run.cfg.vae.z_dim, "cpu")
            recon = decode(vae, torch.from_numpy(encode_frames(vae, frames, 256)[0]))
            cells = [f"{name} px: {n} fr, {pixels:.3f} kept, {any_kept:.3f} any"
                     for name, (n, pixels, any_kept) in fireball_recall(frames, recon).items()]
            print(f"{path}: " + "; ".join(cells), flush=True)
    except UserError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
