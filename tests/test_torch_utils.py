"""Device and precision choice."""

from __future__ import annotations

import pytest
import torch

from worldmodel import torch_utils
from worldmodel.errors import UserError
from worldmodel.torch_utils import resolve_precision


def test_precision_names():
    assert resolve_precision("float32", "cpu") is None
    assert resolve_precision("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(UserError, match="system.precision: 'half'"):
        resolve_precision("half", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native else None)


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu avx2 amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
                            ("fpu avx2 avx512f", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, _i=info, **k: real_open(_i if p == "/proc/cpuinfo" else p, *a, **k))
        assert torch_utils.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("native", [True, False])
def test_the_compute_line_names_the_precision_and_its_cost(monkeypatch, native):
    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: native)
    line = torch_utils.describe_compute("cpu", "auto")
    assert line.startswith(f"compute: cpu, {torch_utils.available_cores()} cores, ")
    assert ("bfloat16 matrix products" in line) is native
    assert ("neither AMX nor AVX-512 BF16" in line) is not native
    emulated = torch_utils.describe_compute("cpu", "bfloat16")
    assert "bfloat16 matrix products" in emulated and ("emulated" in emulated) is not native
    forced = torch_utils.describe_compute("cpu", "float32")  # chosen, not fallen back to: no excuse to print
    assert forced == f"compute: cpu, {torch_utils.available_cores()} cores, float32 (system.precision: float32)"
