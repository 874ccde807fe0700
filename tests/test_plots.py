"""plot: learning curves from the metrics files the stages write (their real key names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from worldmodel.io import append_jsonl
from worldmodel.plots import plot_run
from worldmodel.runs import open_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def vae_record(epoch: int) -> dict:
    """As worldmodel/train_vae.py's _epoch_record writes it."""
    rec = {"epoch": epoch, "img_per_s": 900.0, "train_frames": 200, "val_frames": 40, "time_s": 1.0}
    for term, value in (("recon", 300.0 / epoch), ("kl", 4.0), ("kl_raw", 2.0 + epoch), ("loss", 304.0 / epoch)):
        rec[f"train_{term}"] = value
        rec[f"val_{term}"] = value * 1.1
    return rec


def m_record(epoch: int) -> dict:
    """As worldmodel/train_m.py writes it."""
    rec = {"epoch": epoch, "seconds": 0.5, "done_eval_split": "val", "done_threshold": 0.5,
           "done_precision": 0.5, "done_recall": None if epoch == 1 else 0.7, "false_early_death_rate": 0.1}
    for split in ("train", "val"):
        for term, value in (("loss", 2.0 / epoch), ("z_nll", 1.5 / epoch), ("reward", 0.0), ("done", 0.5)):
            rec[f"{split}/{term}"] = value
    return rec


def dream_record(generation: int) -> dict:
    """As agents/cmaes.py's _one_generation writes it."""
    real = generation % 2 == 0
    return {"generation": generation, "dream_mean": 10.0 + generation, "dream_best": 20.0 + generation,
            "dream_std": 2.0, "dream_worst": 5.0, "centre_dream": 12.0 + generation, "sigma": 0.1,
            "mean_length": 30.0, "dream_steps": 1000, "dream_steps_per_s": 1e5,
            "real_mean": 8.0 + generation if real else None, "real_std": 1.0 if real else None,
            "best_dream_ever": 20.0 + generation, "wall_s": 0.1, "time": 0.0}


def png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_plots_from_metrics(tmp_path):
    run = open_run(tmp_path / "run", SMOKE)
    assert all(v.startswith("skipped") for v in plot_run(run).values())  # nothing trained yet
    for e in (1, 2, 3):
        append_jsonl(run.metrics_path("vae"), vae_record(e))
    append_jsonl(run.metrics_path("vae"), vae_record(3))  # a resumed stage may repeat an epoch
    out = plot_run(run)
    assert out["vae"] == str(run.dir / "plots" / "vae.png")
    assert out["m"].startswith("skipped") and out["dream"].startswith("skipped")
    vae_png = png(out["vae"])
    assert vae_png.shape[0] > 100 and vae_png.std() > 10  # something drawn

    for e in (1, 2):
        append_jsonl(run.metrics_path("m"), m_record(e))
    for g in range(1, 6):
        append_jsonl(run.metrics_path("dream"), dream_record(g))
    with open(run.metrics_path("dream"), "a") as f:
        f.write('{"generation": 6, "dream_me')  # a torn last line from a kill
    out = plot_run(run)
    for stage in ("vae", "m", "dream"):
        assert Path(out[stage]) == run.dir / "plots" / f"{stage}.png"
        png(out[stage])
    assert not list((run.dir / "plots").glob(".*.tmp"))
    assert plot_run(run, stages=("m",)) == {"m": out["m"]}


def test_plots_with_a_single_validation_free_epoch(tmp_path):
    run = open_run(tmp_path / "run", SMOKE)
    rec = vae_record(1)
    rec.update({k: None for k in rec if k.startswith("val_")})  # no validation episodes
    append_jsonl(run.metrics_path("vae"), rec)
    append_jsonl(run.metrics_path("m"), {"epoch": 1, "train/loss": 1.0})  # M's keys, partially
    out = plot_run(run)
    png(out["vae"])
    png(out["m"])


def test_plot_command_line(tmp_path):
    run = open_run(tmp_path / "run", SMOKE)
    append_jsonl(run.metrics_path("dream"), dream_record(1))
    result = subprocess.run([sys.executable, "run.py", "plot", "--run", str(run.dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dream.png" in result.stdout and (run.dir / "plots" / "dream.png").exists()
