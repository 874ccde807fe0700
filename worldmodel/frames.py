"""The run's frames, decoded once into a uint8 memory map.

Episode files are compressed; decompressing them every epoch would cost more
than training on them.  :func:`load_frames` decodes every episode once into
``<run>/cache/frames.u8`` (all frames back to back, (N, 64, 64, 3) uint8) and
records in ``<run>/cache/frames.json`` which episode files (name, size, mtime)
it holds and where each one starts.  The cache is rebuilt when the episode set
changes, and written atomically (temporary file, then rename), so a killed
build never leaves a cache that looks complete.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodel.episodes import list_episodes, load_episode
from worldmodel.errors import UserError
from worldmodel.io import atomic_path, write_json
from worldmodel.runs import Run
from worldmodel.vae import FRAME_SHAPE

CACHE_VERSION = 1
FRAME_BYTES = int(np.prod(FRAME_SHAPE))


@dataclass(frozen=True)
class FrameSet:
    """All frames of a run.  Episode i's frames are ``frames[offsets[i]:offsets[i + 1]]``.

    frames: (N, 64, 64, 3) uint8 memory map; offsets: (E + 1,) int64.
    """

    frames: np.ndarray
    episodes: tuple[Path, ...]
    offsets: np.ndarray
    skipped: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def episode_frames(self, i: int) -> np.ndarray:
        """Frames of episode i: (T_i, 64, 64, 3) uint8 (a view into the memory map)."""
        return self.frames[self.offsets[i]:self.offsets[i + 1]]

    def frame_indices(self, episode_ids: np.ndarray) -> np.ndarray:
        """Indices into ``frames`` of every frame of the given episodes, in order: (n,) int64."""
        ranges = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in episode_ids]
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def cache_paths(run: Run) -> tuple[Path, Path]:
    """(frames file, index file) of a run's frame cache."""
    folder = run.dir / "cache"
    return folder / "frames.u8", folder / "frames.json"


def _signature(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        st = p.stat()
        out.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _read_index(index_path: Path) -> dict | None:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and index.get("version") == CACHE_VERSION else None


def _is_current(index: dict | None, signature: list[dict], frames_path: Path) -> bool:
    if index is None or not frames_path.exists():
        return False
    held = [{k: e[k] for k in ("name", "size", "mtime_ns")} for e in index["episodes"]]
    held = sorted(held + index["skipped"], key=lambda e: e["name"])
    return held == signature and frames_path.stat().st_size == index["frames"] * FRAME_BYTES


def _read_obs(path: Path) -> np.ndarray:
    obs = load_episode(path)["obs"]  # every key, so a file M cannot use is caught here too
    if obs.dtype != np.uint8 or obs.shape[1:] != FRAME_SHAPE:
        raise UserError(
            f"{path}: frames are {obs.dtype} {obs.shape[1:]}, expected uint8 {FRAME_SHAPE}"
        )
    return obs


def _build(paths: list[Path], signature: list[dict], frames_path: Path, index_path: Path,
           skip_bad: bool) -> None:
    index_path.unlink(missing_ok=True)  # a stale index must never describe the new frames file
    episodes, skipped, start = [], [], 0
    with atomic_path(frames_path) as tmp, open(tmp, "wb") as f:
        for path, sig in zip(paths, signature):
            try:
                obs = _read_obs(path)
            except UserError as exc:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping {exc}", stacklevel=3)
                skipped.append(sig)
                continue
            f.write(np.ascontiguousarray(obs).tobytes())
            episodes.append({**sig, "start": start, "length": len(obs)})
            start += len(obs)
    write_json(index_path, {"version": CACHE_VERSION, "frames": start,
                            "episodes": episodes, "skipped": skipped})


def load_frames(run: Run, skip_bad: bool = False) -> FrameSet:
    """The run's frames, from the cache (built or rebuilt first when the episodes changed).

    A corrupt or truncated episode file is a UserError naming it; with
    ``skip_bad`` it is skipped with a warning instead.
    """
    paths = list_episodes(run.episodes_dir)
    if not paths:
        raise UserError(f"{run.episodes_dir}: no collected episodes; run `python run.py collect` first")
    signature = _signature(paths)
    frames_path, index_path = cache_paths(run)
    index = _read_index(index_path)
    built = not _is_current(index, signature, frames_path)
    if built:  # _build warns about each file it skips
        _build(paths, signature, frames_path, index_path, skip_bad)
        index = _read_index(index_path)
    assert index is not None
    skipped = tuple(run.episodes_dir / e["name"] for e in index["skipped"])
    if skipped and not skip_bad:
        raise UserError(f"{skipped[0]}: corrupt or truncated episode file (found when the frame "
                        "cache was built); delete it or pass --skip-bad")
    if skipped and not built:
        warnings.warn(f"skipping {len(skipped)} unreadable episode file(s), first {skipped[0]}",
                      stacklevel=2)
    if not index["episodes"]:
        raise UserError(f"{run.episodes_dir}: no readable episodes (all {len(skipped)} skipped)")
    offsets = np.array([e["start"] for e in index["episodes"]] + [index["frames"]], dtype=np.int64)
    if index["frames"]:
        frames = np.memmap(frames_path, dtype=np.uint8, mode="r", shape=(index["frames"], *FRAME_SHAPE))
    else:
        frames = np.zeros((0, *FRAME_SHAPE), dtype=np.uint8)  # np.memmap cannot map an empty file
    return FrameSet(frames=frames, episodes=tuple(run.episodes_dir / e["name"] for e in index["episodes"]),
                    offsets=offsets, skipped=skipped)


def subsample(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A deterministic random ``fraction`` of ``indices`` (at least one when any), in order."""
    if fraction >= 1.0 or len(indices) == 0:
        return indices
    keep = max(1, int(round(fraction * len(indices))))
    chosen = np.random.default_rng(seed).choice(len(indices), size=keep, replace=False)
    return indices[np.sort(chosen)]
