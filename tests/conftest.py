"""Fixtures shared by the test files.

- ``run_cli(*args, timeout=120)``: ``python run.py *args`` in a subprocess from the
  repository root; returns the ``CompletedProcess`` (text stdout / stderr).
- ``make_run(name="run", overrides=())``: a new run folder under ``tmp_path`` with the
  config of ``configs/smoke.yaml`` plus ``--set`` overrides; returns the ``Run``.
- ``smoke_run``: one per test session, a run (configs/smoke.yaml) holding 2 collected
  TakeCover episodes of 40 steps, collected in-process.  Shared: treat it as
  read-only, and copy it (``shutil.copytree(smoke_run.dir, tmp_path / "run")``,
  then ``open_run``) before changing anything.

``ROOT`` and ``SMOKE`` (repository root, configs/smoke.yaml) and :func:`linear_world_batch`
(a toy world for M's training tests) can be imported from here, e.g. ``from conftest import ROOT``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from worldmodel.runs import Run, open_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_RUN_OVERRIDES = ("collect.episodes=2", "collect.max_steps=40", "env.max_steps=40")


def linear_world_batch(b: int, t: int, z_dim: int, action_dim: int, end_in_death: bool = True) -> dict:
    """A batch for ``WorldModel.loss`` from a tiny deterministic world: z_{t+1} = 0.8 z_t + a_t[0].

    Actions and z_0 are drawn from torch's global generator (seed it first); reward = Σ z;
    with ``end_in_death`` every sequence ends in a death.
    """
    import torch

    action, z = torch.randn(b, t, action_dim), torch.zeros(b, t, z_dim)
    z[:, 0] = torch.randn(b, z_dim)
    for i in range(1, t):
        z[:, i] = 0.8 * z[:, i - 1] + action[:, i - 1, :1]
    terminated = torch.zeros(b, t, dtype=torch.bool)
    terminated[:, -1] = end_in_death
    return {"z": z, "action": action, "reward": z.sum(-1), "terminated": terminated,
            "mask": torch.ones(b, t, dtype=torch.bool)}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors on a shared 2-core machine: one thread is fastest and steadiest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    # Box2D's SWIG bindings (CarRacing) warn on import under Python 3.11+; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    return run


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Run]:
    def make(name: str = "run", overrides: tuple[str, ...] | list[str] = ()) -> Run:
        return open_run(tmp_path / name, SMOKE, list(overrides))

    return make


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from agents.collect import collect

    run = open_run(tmp_path_factory.mktemp("smoke") / "run", SMOKE, list(SMOKE_RUN_OVERRIDES))
    collect(run, workers=1, progress=False)
    return run
