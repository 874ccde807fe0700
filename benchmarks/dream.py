"""Dream speed: one CMA-ES generation (population × rollouts dreams) as one batch.

MDN-RNN at the TakeCover sizes (z 64, 5 mixtures, one action; hidden 256 and 512),
linear controller on [z, h].  Dream steps per second (one step of one dream) of:

- batched: :func:`envs.dream.dream_rollouts` on the whole generation (64 × 16 = 1024
  dreams), through ``MDNRNN.imagine_step`` (the fused step);
- batched, bfloat16: the same with the step's two matrix products in bfloat16
  (``system.precision``; fast where the CPU has AMX or AVX-512 BF16);
- batched, joint mixture: an M with ``model.mixture: joint`` (one component for the whole z;
  a smaller head, plus a copy of the logits across z each step), same sizes otherwise;
- batched, unfused: the same M stepped through ``nn.LSTM``, the heads as they are trained
  and argmax + gather (:class:`UnfusedMDNRNN`), for reference;
- one at a time: the same function and M, one dream after another;
- the FLOP bound: FLOPs of one dream step (LSTM gates, heads, controller; elementwise
  work not counted) against the FLOP/s of the step's two GEMMs timed as plain
  ``torch.mm`` calls of the same sizes in this process.

No dream ends early (done threshold 1), so each batched call runs N × steps dream steps.
Rounds alternate between variants so that load from other processes hits all alike;
the best round of each is reported.

    python benchmarks/dream.py [--hidden 256 512] [--steps 100] [--rounds 3] [--threads N]

Results: docs/benchmarks.md, "Dream".
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from agents.controller import ControllerSpec
from envs.dream import DreamSettings, dream_rollouts
from worldmodel.config import Config
from worldmodel.mdnrnn import MDNRNN

Z_DIM, MIXTURES, ACTION_DIM = 64, 5, 1


class UnfusedMDNRNN(MDNRNN):
    """The MDN-RNN stepped the plain way: ``nn.LSTM`` for one step, ``heads``, and the
    component picked by argmax + gather — what the fused ``imagine_step`` is timed against."""

    def features(self, state, z, mode):
        return torch.cat([z, state[0]], dim=-1)

    def imagine_step(self, state, z, action, temperature, generator=None, noise=None):
        p, state = self(z[:, None], action[:, None], state)
        gumbel, eps = noise
        k = (p["logits"][:, 0] / temperature + gumbel.transpose(1, 2)).argmax(-1, keepdim=True)
        mu, sigma = p["mu"][:, 0].gather(-1, k)[..., 0], p["log_sigma"][:, 0].gather(-1, k)[..., 0].exp()
        return state, mu + sigma * temperature**0.5 * eps, p["reward"][:, 0], torch.sigmoid(p["done_logit"][:, 0])


def seconds(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(hidden: int, feature_dim: int) -> dict[str, int]:
    """Multiply-adds × 2 of one dream step, by part."""
    heads_out = 3 * Z_DIM * MIXTURES + 2
    return {
        "lstm": 2 * (Z_DIM + ACTION_DIM + 1 + hidden) * 4 * hidden,
        "heads": 2 * (hidden + 1) * heads_out,
        "controller": 2 * (feature_dim + 1) * ACTION_DIM,
    }


def gemm_round(n: int, hidden: int, reps: int = 10) -> Callable[[], None]:
    """``reps`` dream steps' worth of the step's two GEMMs as plain torch.mm (preallocated outputs)."""
    g = torch.Generator().manual_seed(0)
    k1, heads_out = Z_DIM + ACTION_DIM + 1 + hidden, 3 * Z_DIM * MIXTURES + 2
    x, w = torch.randn(n, k1, generator=g), torch.randn(k1, 4 * hidden, generator=g)
    h, wh = torch.randn(n, hidden + 1, generator=g), torch.randn(hidden + 1, heads_out, generator=g)
    o1, o2 = torch.empty(n, 4 * hidden), torch.empty(n, heads_out)

    def run() -> None:
        for _ in range(reps):
            torch.mm(x, w, out=o1)
            torch.mm(h, wh, out=o2)

    return run


def bench_hidden(hidden: int, population: int, rollouts: int, steps: int, single: int, rounds: int) -> dict:
    cfg = Config()
    cfg.vae.z_dim, cfg.model.hidden, cfg.model.mixtures = Z_DIM, hidden, MIXTURES
    m = MDNRNN.from_config(cfg, Z_DIM, ACTION_DIM).eval()
    unfused = UnfusedMDNRNN.from_config(cfg, Z_DIM, ACTION_DIM).eval()
    unfused.load_state_dict(m.state_dict())
    low = MDNRNN.from_config(cfg, Z_DIM, ACTION_DIM).eval()
    low.load_state_dict(m.state_dict())
    low.set_dream_precision(torch.bfloat16)
    cfg.model.mixture = "joint"
    joint = MDNRNN.from_config(cfg, Z_DIM, ACTION_DIM).eval()
    spec = ControllerSpec.for_env("takecover", m.feature_dim("zh"))
    n = population * rollouts
    g = torch.Generator().manual_seed(0)
    params = 0.1 * torch.randn(n, spec.num_params, generator=g)
    z0 = torch.randn(n, Z_DIM, generator=g)
    streams = torch.arange(rollouts).repeat(population)
    settings = DreamSettings(max_steps=steps, done="threshold", done_threshold=1.0)

    def batched(model: MDNRNN) -> Callable[[], None]:
        return lambda: dream_rollouts(model, params, spec, z0, settings, g, streams)

    def one_at_a_time() -> None:
        for i in range(single):
            dream_rollouts(m, params[i: i + 1], spec, z0[i: i + 1], settings, g)

    gemm_reps = 10
    variants = {"batched": batched(m), "batched_bf16": batched(low), "batched_joint": batched(joint),
                "batched_unfused": batched(unfused),
                "one_at_a_time": one_at_a_time, "gemm": gemm_round(n, hidden, gemm_reps)}
    for fn in variants.values():  # warm up
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], seconds(fn))
    counts = {"batched": n * steps, "batched_bf16": n * steps, "batched_joint": n * steps, "batched_unfused": n * steps,
              "one_at_a_time": single * steps}
    rate = {name: counts[name] / best[name] for name in counts}
    flops = step_flops(hidden, spec.feature_dim)
    flop_s = n * gemm_reps * (flops["lstm"] + flops["heads"]) / best["gemm"]
    bound = flop_s / sum(flops.values())
    return {"hidden": hidden, "dreams": n, "steps": steps, **{f"{k}_steps_per_s": v for k, v in rate.items()},
            "flops_per_step": sum(flops.values()), "gemm_gflop_s": flop_s / 1e9, "bound_steps_per_s": bound,
            "batched_vs_one": rate["batched"] / rate["one_at_a_time"], "batched_vs_bound": rate["batched"] / bound,
            "bf16_vs_float32": rate["batched_bf16"] / rate["batched"],
            "joint_vs_per_dim": rate["batched_joint"] / rate["batched"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="dream steps per batched call")
    parser.add_argument("--single", type=int, default=8, help="dreams in the one-at-a-time loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
    with torch.inference_mode():
        for hidden in args.hidden:
            r = bench_hidden(hidden, args.population, args.rollouts, args.steps, args.single, args.rounds)
            print(f"\nhidden {hidden}: {r['dreams']} dreams × {r['steps']} steps, "
                  f"{r['flops_per_step'] / 1e6:.2f} MFLOP per dream step, GEMMs at {r['gemm_gflop_s']:.0f} GFLOP/s")
            print(f"  batched (fused step)        {r['batched_steps_per_s']:>10,.0f} steps/s")
            print(f"  batched, bfloat16 products  {r['batched_bf16_steps_per_s']:>10,.0f} steps/s")
            print(f"  batched, joint mixture      {r['batched_joint_steps_per_s']:>10,.0f} steps/s")
            print(f"  batched (unfused, nn.LSTM)  {r['batched_unfused_steps_per_s']:>10,.0f} steps/s")
            print(f"  one dream at a time         {r['one_at_a_time_steps_per_s']:>10,.0f} steps/s")
            print(f"  FLOP bound                  {r['bound_steps_per_s']:>10,.0f} steps/s")
            print(f"  batched / one at a time     {r['batched_vs_one']:>10.1f}x")
            print(f"  batched / bound             {100 * r['batched_vs_bound']:>10.0f}%")
            print(f"  bfloat16 / float32          {r['bf16_vs_float32']:>10.2f}x")
            print(f"  joint / per-dimension       {r['joint_vs_per_dim']:>10.2f}x")


if __name__ == "__main__":
    main()
