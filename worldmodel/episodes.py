"""Episode files: one compressed ``.npz`` per episode, plus a manifest.

Keys (T = steps in the episode; step t holds the frame seen, the action taken
on it, and what followed that action):

- ``obs``        uint8   (T, 64, 64, 3)  frame before the action
- ``action``     float32 (T, A)          action taken
- ``reward``     float32 (T,)            reward received after the action
- ``done``       bool    (T,)            episode ended after the action (True only at T-1)
- ``terminated`` bool    (T,)            ended by the game (death / failure), not by the step cap

See docs/data.md.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from worldmodel.errors import UserError
from worldmodel.io import atomic_path, write_json

KEYS = ("obs", "action", "reward", "done", "terminated")
MANIFEST = "manifest.json"
COMPRESS_LEVEL = 1


def episode_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"ep_{index:06d}.npz"


def episode_index(path: str | os.PathLike) -> int:
    return int(Path(path).stem.split("_")[1])


def save_episode(path: str | os.PathLike, episode: dict[str, np.ndarray]) -> None:
    """Write an episode atomically: a half-written file never has the final name.

    The file is what ``np.savez_compressed`` writes, but at zlib level 1 rather
    than 6: ~5x faster for ~10% larger TakeCover files (docs/benchmarks.md, "Collect").
    """
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
            for key, array in episode.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def load_episode(path: str | os.PathLike, keys: tuple[str, ...] = KEYS) -> dict[str, np.ndarray]:
    """Read an episode; a corrupt, truncated or incomplete file is a UserError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UserError(f"{path}: episode file lacks {', '.join(missing)}")
            out = {k: data[k] for k in keys}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path}: corrupt or truncated episode file ({type(exc).__name__})") from None
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: episode arrays differ in length {lengths}")
    return out


def list_episodes(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("ep_*.npz") if not p.name.startswith("."))


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {"episodes": {}}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {"episodes": {}}  # rebuilt from the episode files by collect


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    write_json(Path(folder) / MANIFEST, manifest)
