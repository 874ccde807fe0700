"""M's training pass: skipping the windows' padding (ours) against computing it (the baseline).

A training batch is ``model.batch_size`` windows padded to ``model.seq_len`` steps. Windows
tile each episode from a random offset, so on TakeCover's data over a third of the B x T rows
are padding (41 % of them on the preset's 3,000 held-random episodes, 37 % after three
iterations). ``MDNRNN.loss`` skips it: the LSTM runs in segments of ``MDNRNN.segment`` steps,
each over the windows not yet ended (oneDNN's LSTM wants whole rectangles), and the mixture,
reward and done heads and their losses run on the real steps only. The losses and gradients
are those of the whole padded batch with the padding masked out (tests/test_mdnrnn.py).

The baseline is the loss as it was before: the LSTM and the heads over all B x T rows, the
padding masked out of the means. Each variant runs ``worldmodel.train_m._pass`` (gather,
forward, loss, backward, clipping, Adam) in this process over the same windows from the same
weights, with the precision ``train-rnn`` picks on this CPU; rounds alternate so that load
from other processes hits all alike, and the best round of each is reported with its speed
over the baseline's. The pass's mean losses are printed too: they agree to rounding.

    python benchmarks/m_padding.py                        # synthetic episodes of TakeCover-like lengths
    python benchmarks/m_padding.py --run runs/z3a0 --episodes 600 --segments 8 16 32

Results: docs/benchmarks.md, "Training the M files".
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from m_members import PRESET, synthetic_latents  # this folder's neighbour (run as a script)

from worldmodel import config as config_lib
from worldmodel.latents import list_latents, load_latents, windows
from worldmodel.m import build_m
from worldmodel.mdnrnn import MDNRNN
from worldmodel.mixture import masked_mean
from worldmodel.torch_utils import available_cores
from worldmodel.train_m import _pass, _precision


def all_rows_loss(m: MDNRNN, batch: dict[str, torch.Tensor], state=None):
    """The baseline: ``MDNRNN.loss_and_state`` as it was, the LSTM and the heads on all B x T rows."""
    p, final = m(batch["z"], batch["action"], state, step=batch.get("step"))
    mask = batch["mask"]
    z_mask = mask[:, :-1] & mask[:, 1:]
    z_logp = m.z_log_prob({k: v[:, :-1] for k, v in p.items()}, batch["z"][:, 1:])
    z_nll = masked_mean(-z_logp / m.z_dim, z_mask)
    reward = masked_mean((p["reward"] - batch["reward"]) ** 2, mask) if m.predict_reward else z_nll.new_zeros(())
    done = masked_mean(F.binary_cross_entropy_with_logits(
        p["done_logit"], batch["terminated"].to(z_nll.dtype), pos_weight=m.done_pos_weight, reduction="none"), mask)
    loss = z_nll + m.reward_weight * reward + m.done_weight * done
    return {"loss": loss, "z_nll": z_nll, "reward": reward, "done": done}, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run whose latents/ to train on (default: synthetic)")
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--mean-steps", type=int, default=91, help="synthetic episodes' mean length "
                        "(91: the preset's held-random TakeCover episodes)")
    parser.add_argument("--segments", type=int, nargs="+", default=[16], help="MDNRNN.segment values "
                        "to time (16: the default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (train_m's workers use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_lib.load(args.config)
    device = torch.device("cpu")
    precision = _precision(cfg, device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "latents"
        if args.run is None:
            # lengths that scatter like TakeCover's random play: at least 20 steps, geometric after
            lengths = 20 + np.random.default_rng(0).geometric(1.0 / (args.mean_steps - 20), args.episodes)
            synthetic_latents(folder, args.episodes, lengths, cfg.vae.z_dim)
        else:
            folder.mkdir()
            for path in list_latents(args.run / "latents")[: args.episodes]:
                (folder / path.name).symlink_to(path.resolve())
        data = load_latents(folder, cfg.vae.z_dim)
    z = data.sample_z(np.random.default_rng(0))
    starts, lengths = windows(data, cfg.model.seq_len, np.random.default_rng(1))  # as each pass cuts them
    padding = 1.0 - lengths.sum() / (len(starts) * cfg.model.seq_len)
    variants = ["padded (before)", *[f"segments of {n}" for n in args.segments]]
    best: dict[str, float] = {}
    losses: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up all
        for name in variants:
            torch.manual_seed(0)
            m = build_m(cfg, data.z_dim, data.action_dim)
            if name == variants[0]:
                m.loss = lambda batch, m=m: all_rows_loss(m, batch)[0]
            else:
                m.segment = int(name.split()[-1])
            opt = torch.optim.Adam(m.parameters(), lr=cfg.model.lr)
            start = time.perf_counter()
            terms = _pass(m, data, z, cfg, device, np.random.default_rng(1), opt, desc=name, precision=precision)
            seconds = time.perf_counter() - start
            losses[name] = terms["loss"]
            if round_:
                best[name] = min(best.get(name, np.inf), seconds)
    print(f"torch {torch.__version__}, {args.threads} thread(s) of {available_cores()} cores, "
          f"{platform.processor() or platform.machine()}; M {cfg.model.m} hidden {cfg.model.hidden}, "
          f"batch {cfg.model.batch_size} x {cfg.model.seq_len} steps, precision {precision or 'float32'}; "
          f"{data.n_episodes} episodes, {len(starts)} windows a pass, {padding:.0%} of the rows padding; "
          f"best of {args.rounds} rounds")
    base = best[variants[0]]
    for name in variants:
        print(f"{name:16s}: {best[name]:6.2f} s a pass, mean loss {losses[name]:.4f}, "
              f"{base / best[name]:.2f}x the baseline's speed")


if __name__ == "__main__":
    main()
