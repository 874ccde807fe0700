"""M's training speed against ``model.batch_size``: windows a second on one thread.

``train_m`` trains each M file in a one-thread process (benchmarks/m_members.py), so the
speed that counts is one thread's.  A larger minibatch gives the LSTM larger matrix
products, which might train more windows a second; it also takes fewer Adam steps an
epoch, so it is worth a look at equal quality only if it is faster.  This times one
training pass (``worldmodel.train_m._pass``: gather, forward, loss, backward, clipping,
Adam) over the same synthetic latents at each batch size, with the precision
``train-rnn`` would pick on this CPU, the rest of the config as ``--config``.  The
baseline is the config's own ``model.batch_size``.  Rounds alternate between the sizes so
that load from other processes hits all alike; the best round of each is reported, and
its speed over the baseline's.

    python benchmarks/m_batch.py                          # the preset, batch 32 / 64 / 128
    python benchmarks/m_batch.py --sizes 16 32 256 --episodes 100 --rounds 3

Results: docs/benchmarks.md, "Training the M files".
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from m_members import PRESET, synthetic_latents  # this folder's neighbour (run as a script)

from worldmodel import config as config_lib
from worldmodel.latents import load_latents, windows
from worldmodel.m import build_m
from worldmodel.torch_utils import available_cores
from worldmodel.train_m import _pass, _precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="batch sizes to time")
    parser.add_argument("--episodes", type=int, default=60, help="synthetic episodes of 300 steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (train_m's workers use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_lib.load(args.config)
    base = cfg.model.batch_size
    sizes = [base, *[s for s in dict.fromkeys(args.sizes) if s != base]]
    device = torch.device("cpu")
    precision = _precision(cfg, device)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_latents(Path(tmp) / "latents", args.episodes, 300, cfg.vae.z_dim)
        data = load_latents(Path(tmp) / "latents", cfg.vae.z_dim)
    rng = np.random.default_rng(0)
    z = data.sample_z(rng)
    best: dict[int, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up every size
        for size in sizes:
            sized = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, batch_size=size))
            torch.manual_seed(0)
            m = build_m(sized, data.z_dim, data.action_dim)
            opt = torch.optim.Adam(m.parameters(), lr=sized.model.lr)
            start = time.perf_counter()
            _pass(m, data, z, sized, device, np.random.default_rng(1), opt, desc=f"batch {size}",
                  precision=precision)
            seconds = time.perf_counter() - start
            if round_:
                best[size] = min(best.get(size, np.inf), seconds)
    n_windows = len(windows(data, cfg.model.seq_len, np.random.default_rng(1))[0])  # as each pass cuts them
    print(f"torch {torch.__version__}, {args.threads} thread(s) of {available_cores()} cores, "
          f"{platform.processor() or platform.machine()}; M {cfg.model.m} hidden {cfg.model.hidden}, "
          f"seq_len {cfg.model.seq_len}, precision {precision or 'float32'}; {args.episodes} episodes "
          f"({n_windows} windows a pass), best of {args.rounds} rounds")
    for size in sizes:
        print(f"batch {size:4d}: {best[size]:.2f} s a pass, {n_windows / best[size]:.0f} windows/s, "
              f"{best[base] / best[size]:.2f}x batch {base}'s speed")


if __name__ == "__main__":
    main()
