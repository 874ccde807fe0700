"""float32 against bfloat16 (``system.precision``) on a trained run: speed and what changes.

Two checks, each running both precisions in this process on the same data and seeds:

- **V**: a fresh ConvVAE trained ``--vae-steps`` Adam steps on the run's frames (the same
  minibatches for both), then its loss on up to 2,000 validation frames; prints img/s and
  the validation terms.  bfloat16 runs the forward pass under autocast, as ``train-vae`` does.
- **dream**: the run's controller in ``--dreams`` dreams of the run's M (τ, done rule and
  seeds as ``evaluate`` reports them), with the step's matrix products in float32, then in
  bfloat16; prints the mean ± std and seconds of each, twice (alternating).

    python benchmarks/precision.py --run runs/tc3 [--vae-steps 600] [--dreams 256] [--threads 1]

Results: docs/benchmarks.md, "VAE training step" and "Dream".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from agents.evaluate import dream_score
from worldmodel.runs import open_run
from worldmodel.train_vae import _batches, _evaluate, load_frames, make_optimizer, split_frames
from worldmodel.vae import ConvVAE, preprocess, vae_loss


def vae_check(run, steps: int) -> None:
    frames = load_frames(run)
    train, val = split_frames(frames, run.cfg.vae)
    val = val[:: max(1, len(val) // 2000)]
    cfg = run.cfg.vae
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        vae = ConvVAE.from_config(run.cfg)
        opt = make_optimizer(vae, cfg.lr)
        start = time.perf_counter()
        for i, idx in enumerate(_batches(train, cfg.batch_size, np.random.default_rng(0))):
            if i == steps:
                break
            x = preprocess(frames.frames[idx])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                recon, mu, logvar = vae(x)
            loss = vae_loss(x, recon.float(), mu.float(), logvar.float(), cfg.kl_tolerance, cfg.beta)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - start
        terms = _evaluate(vae, frames, val, cfg, torch.device("cpu"))
        print(f"V {'bfloat16' if dtype else 'float32':8s} {steps} steps: {steps * cfg.batch_size / seconds:7.0f} img/s, "
              f"val loss {terms['loss']:.2f} (recon {terms['recon']:.2f}, KL {terms['kl_raw']:.2f}) "
              f"on {len(val)} frames", flush=True)


def dream_check(run, dreams: int) -> None:
    for precision in ("float32", "bfloat16", "float32", "bfloat16"):
        run.cfg.system.precision = precision
        start = time.perf_counter()
        s = dream_score(run, dreams, seed=123)
        print(f"dream {precision:8s}: {s['mean']:.1f} ± {s['std']:.1f} over {dreams} dreams, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained run folder (episodes, M, controller)")
    parser.add_argument("--vae-steps", type=int, default=600, help="0 skips the V check")
    parser.add_argument("--dreams", type=int, default=256, help="0 skips the dream check")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = open_run(args.run, None, [], create=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, run {args.run}")
    if args.dreams:
        dream_check(run, args.dreams)
    if args.vae_steps:
        vae_check(run, args.vae_steps)


if __name__ == "__main__":
    main()
