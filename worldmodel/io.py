"""Atomic file writes and safe checkpoint loading.

Every file a run keeps is written to a temporary name in the same folder and
then renamed, so a killed process never leaves a half-written file that looks
complete.  Checkpoints load with ``weights_only=True``: a downloaded agent or a
tampered run folder cannot execute code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldmodel.errors import UserError

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; keep the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one metrics record (a line of JSON); lines are small, so appends are whole."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a torn last line left by a kill."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """``torch.save`` through a temporary file and a rename."""
    import torch  # here, not at the top: collect's workers write files and must start without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without running code from it (``weights_only=True``)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load checkpoint ({first})") from None


def load_state_dict_checked(module: torch.nn.Module, state: dict, source: str | os.PathLike) -> None:
    """Load ``state`` into ``module`` after checking every key and shape, naming the file on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not fit {type(module).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in own.items():
        got = tuple(state[key].shape)
        if got != tuple(tensor.shape):
            raise UserError(
                f"{source}: {key} has shape {got}, config expects {tuple(tensor.shape)}"
            )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
