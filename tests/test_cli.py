"""`python run.py` on bad input: one line on stderr starting "error:", no traceback, nothing changed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import SMOKE

from worldmodel import config as config_lib


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` but the run's (empty when free) lock file: (mtime, content hash)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _assert_user_error(result, *named: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for text in named:
        assert text in lines[0]


@pytest.fixture
def existing_run(smoke_run, tmp_path):
    """A copy of the shared smoke run, and a snapshot of its files."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run.dir, run_dir)
    return run_dir, _snapshot(run_dir)


@pytest.mark.parametrize("args, named", [
    (["--set", "env.name=pong"], ["env.name", "pong"]),
    (["--set", "vae.zdim=3"], ["vae.zdim"]),
    (["--set", "vae.z_dim=-3"], ["vae.z_dim", "-3"]),
    (["--set", "vae.z_dim"], ["vae.z_dim"]),
    (["--config", "configs/missing.yaml"], ["missing.yaml", "not found"]),
], ids=["unknown-env", "unknown-key", "out-of-range", "no-value", "missing-config"])
def test_bad_input_on_existing_run(run_cli, existing_run, args, named):
    run_dir, before = existing_run
    _assert_user_error(run_cli("collect", "--run", run_dir, "--quiet", *args), *named)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("text, named", [
    ("env: [takecover\n", ["bad.yaml", "malformed YAML", "line 2"]),
    ("- a list\n- not sections\n", ["bad.yaml", "mapping"]),
    ("vae:\n  zdim: 3\n", ["vae.zdim"]),
], ids=["malformed", "not-a-mapping", "unknown-key"])
def test_bad_config_file(run_cli, tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _assert_user_error(run_cli("collect", "--config", path, "--run", tmp_path / "run"), *named)
    assert not (tmp_path / "run").exists()


def test_unreadable_config_file(run_cli, tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    _assert_user_error(run_cli("collect", "--config", path, "--run", tmp_path / "run"), str(path))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    _assert_user_error(run_cli("collect", "--config", folder, "--run", tmp_path / "run"), "not a file")
    assert not (tmp_path / "run").exists()


def test_run_path_that_is_a_file(run_cli, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    _assert_user_error(run_cli("collect", "--config", SMOKE, "--run", path), str(path), "not a folder")
    assert path.read_text() == "keep me"


def test_workers_zero(run_cli, tmp_path):
    result = run_cli("collect", "--config", SMOKE, "--run", tmp_path / "run", "--workers", "0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "--workers" in result.stderr
    assert not (tmp_path / "run").exists()


def test_other_config_on_existing_run_is_refused(run_cli, existing_run, tmp_path):
    run_dir, before = existing_run
    other = tmp_path / "other.yaml"
    other.write_text(SMOKE.read_text().replace("z_dim: 8", "z_dim: 16"))
    _assert_user_error(run_cli("collect", "--config", other, "--run", run_dir), "vae.z_dim", str(other))
    _assert_user_error(run_cli("collect", "--config", "configs/demo.yaml", "--run", run_dir), "demo.yaml")
    assert _snapshot(run_dir) == before


def test_rerun_of_the_same_command_resumes(run_cli, existing_run, smoke_run):
    """The command that made the run, --set overrides included, runs again without complaint."""
    run_dir, before = existing_run
    overrides = [a for o in config_lib.diff(config_lib.load(SMOKE), smoke_run.cfg)
                 for a in ("--set", f"{o}={config_lib.to_flat(smoke_run.cfg)[o]}")]
    assert overrides  # the shared run was made with overrides
    result = run_cli("collect", "--config", SMOKE, "--run", run_dir, "--quiet", *overrides)
    assert result.returncode == 0, result.stderr
    assert "new_episodes: 0" in result.stdout
    assert _snapshot(run_dir) == before
