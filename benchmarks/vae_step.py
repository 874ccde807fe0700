"""VAE training step: ours (worldmodel.vae) against a plain PyTorch version of the same network.

Both run in this process with the same thread count on the same uint8 frames:
a minibatch is gathered, converted to float, pushed through the paper's ConvVAE,
the free-bits ELBO is computed and Adam takes a step.  Rounds alternate between
the two so that load from other processes hits both alike; the medians are
reported.

    python benchmarks/vae_step.py [--steps 10] [--rounds 3] [--threads N]
        [--channels-last] [--compile] [--bf16]     # variants of ours, to compare

``--bf16`` runs ours under bfloat16 autocast, as ``system.precision`` does in training
(fast where the CPU has AMX or AVX-512 BF16); plain stays float32.

Results: docs/benchmarks.md, "VAE training step".
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.train_vae import make_optimizer
from worldmodel.vae import ConvVAE, preprocess, vae_loss

KL_TOLERANCE = 0.5
BETA = 1.0
LR = 1e-4


class PlainVAE(nn.Module):
    """The same network written the usual way: nn.Sequential and nn.ConvTranspose2d throughout."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2), nn.ReLU(), nn.Conv2d(128, 256, 4, 2), nn.ReLU(), nn.Flatten(),
        )
        self.mu, self.logvar, self.fc = nn.Linear(1024, z_dim), nn.Linear(1024, z_dim), nn.Linear(z_dim, 1024)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, 2), nn.ReLU(), nn.ConvTranspose2d(128, 64, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, 2), nn.ReLU(), nn.ConvTranspose2d(32, 3, 6, 2), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.dec(self.fc(z).view(-1, 1024, 1, 1)), mu, logvar


def plain_step_fn(z_dim: int) -> Callable[[np.ndarray], None]:
    model = PlainVAE(z_dim)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step(batch: np.ndarray) -> None:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float() / 255.0
        recon, mu, logvar = model(x)
        rec = F.mse_loss(recon, x, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
        loss = rec + BETA * torch.clamp(kl, min=KL_TOLERANCE * z_dim).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def our_step_fn(z_dim: int, channels_last: bool, compile_: bool,
                bf16: bool = False) -> Callable[[np.ndarray], None]:
    vae = ConvVAE(z_dim)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    opt = make_optimizer(vae, LR)

    def train_step(x: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            recon, mu, logvar = vae(x)
        terms = vae_loss(x, recon.float(), mu.float(), logvar.float(), KL_TOLERANCE, BETA)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    compiled = torch.compile(train_step) if compile_ else train_step

    def step(batch: np.ndarray) -> None:
        compiled(preprocess(batch))

    return step


def time_steps(step: Callable[[np.ndarray], None], pool: np.ndarray, batch: int, steps: int,
               rng: np.random.Generator) -> float:
    """img/s over ``steps`` steps on random minibatches of ``pool``."""
    batches = [pool[np.sort(rng.choice(len(pool), batch, replace=False))] for _ in range(steps)]
    start = time.perf_counter()
    for b in batches:
        step(b)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--z-dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels-last", action="store_true", help="ours: weights in channels_last")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the step")
    parser.add_argument("--bf16", action="store_true", help="ours: bfloat16 autocast (system.precision)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (10 * args.batch, 64, 64, 3), dtype=np.uint8)
    steps = {"ours": our_step_fn(args.z_dim, args.channels_last, args.compile, args.bf16),
             "plain": plain_step_fn(args.z_dim)}
    for step in steps.values():
        time_steps(step, pool, args.batch, args.warmup, rng)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(time_steps(step, pool, args.batch, args.steps, rng))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, load {load:.2f}; batch {args.batch}, "
          f"z {args.z_dim}, {args.rounds} rounds x {args.steps} steps"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
          f"{', ours in bfloat16 autocast' if args.bf16 else ''}")
    for name, r in rates.items():
        print(f"{name:6s} {statistics.median(r):8.1f} img/s  (rounds: {', '.join(f'{x:.0f}' for x in r)})")
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
    print(f"ratio ours/plain: {ratio:.2f}x")


if __name__ == "__main__":
    main()
