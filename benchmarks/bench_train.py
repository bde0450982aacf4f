"""Training-step speed and peak memory of `pmf_loss` against a straightforward implementation of the same objective.

The straightforward version follows the objective of docs/algorithm.md literally: three no-grad target passes of
the full two-head network (conditional with raw ω, unconditional, conditional with interval-masked ω), then one
`torch.func.jvp` through the full two-head network with autograd on, backpropagating through its primal outputs.
`pmf_loss` computes the same loss and gradients with a v-head-only 2B target pass, a no-grad u-head-only JVP and one
ordinary forward.

Each variant runs in a fresh subprocess (so peak RSS is per variant); steps alternate A/B across rounds and the
median is reported. Both variants see identical weights and draws, and their losses are compared.

    python benchmarks/bench_train.py --shape tiny --steps 5
    python benchmarks/bench_train.py --shape B/16 --batch-size 2 --steps 3 --output bench_train.json
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    # The tiny test shape (tinyA) and the pMF-B/16 training network (with its v-head).
    "tiny": dict(sample_size=32, patch_size=8, num_layers=2, num_head_layers=2, num_attention_heads=4,
                 attention_head_dim=16, mlp_hidden_dim=170, num_classes=10),
    "B/16": dict(sample_size=256, patch_size=16, num_layers=8, num_head_layers=8, num_attention_heads=12,
                 attention_head_dim=64, mlp_hidden_dim=2048, num_classes=1000),
}


def straightforward_loss(model, images, labels, config, draws):
    """The objective exactly as the spec describes it, with no reuse."""
    from diffusers.models.attention_dispatch import attention_backend

    num_classes = model.config.num_classes
    batch = images.shape[0]

    def col(values):
        return values.reshape(-1, 1, 1, 1)

    t, r, omega, t_min, t_max = draws.t, draws.r, draws.omega, draws.t_min, draws.t_max
    floor = col(t).clamp(0.05, 1.0)
    z = (1 - col(t)) * images + col(t) * draws.noise
    v_t = (z - images) / floor
    zeros, ones = torch.zeros(batch, device=images.device), torch.ones(batch, device=images.device)

    def full_net(z_in, time, r_time, y, w, lo, hi):
        x_u, x_v = model(z_in, time, r_time, y, w, lo, hi, head="both", return_dict=False)
        clip = col(time).clamp(0.05, 1.0)
        return (z_in - x_u) / clip, (z_in - x_v) / clip

    with torch.no_grad():
        _, v_c_raw = full_net(z, t, t, labels, omega, zeros, ones)
        _, v_u = full_net(z, t, t, torch.full_like(labels, num_classes), ones, zeros, ones)
        omega_masked = torch.where((t_min <= t) & (t <= t_max), omega, ones)
        _, v_c = full_net(z, t, t, labels, omega_masked, zeros, ones)
    fm = (draws.t == draws.r) & (t_min == 0) & (t_max == 1)
    v_g = torch.where(col(fm), v_t + (1 - 1 / col(omega)) * (v_c_raw - v_u),
                      v_t + (1 - 1 / col(omega_masked)) * (v_c - v_u))
    y = torch.where(draws.drop_mask, torch.full_like(labels, num_classes), labels)
    v_g = torch.where(col(draws.drop_mask), v_t, v_g)

    with attention_backend("_native_math"):
        (u, v), (du_dt, _) = torch.func.jvp(
            lambda z_in, time, r_time: full_net(z_in, time, r_time, y, omega, t_min, t_max),
            (z, t, r), (v_c, ones, zeros),
        )
    V = u + col(t - r) * du_dt.detach()
    loss_u = (V - v_g).pow(2).sum((1, 2, 3))
    loss_v = (v - v_g).pow(2).sum((1, 2, 3))
    weight = lambda loss: loss / (loss.detach() + config.norm_eps) ** config.norm_p  # noqa: E731
    return (weight(loss_u) + weight(loss_v)).mean()


def run_variant(variant: str, shape: str, batch_size: int, steps: int, threads: int | None) -> dict:
    from pmf_diffusers import PMFTransformer2DModel
    from pmf_diffusers.training import PMFLossConfig, pmf_loss, sample_draws

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PMFTransformer2DModel(**SHAPES[shape])
    # Random, non-degenerate weights: the official init zeroes the gates and output layers.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    config = PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0)
    size = model.config.sample_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    labels = torch.randint(0, model.config.num_classes, (batch_size,), generator=generator)
    draws = sample_draws(batch_size, config, generator, (3, size, size))
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times, losses = [], []
    for _ in range(steps + 1):  # the first step is warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if variant == "pmf_loss":
            loss = pmf_loss(model, images, labels, config, draws=draws).loss
        else:
            loss = straightforward_loss(model, images, labels, config, draws)
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "step_times_s": times[1:],
        "loss": losses[-1],
        "peak_rss_mb": peak_rss / 1024,
        "peak_rss_over_model_mb": (peak_rss - baseline_rss) / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B alternations (each in fresh processes)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        print(json.dumps(run_variant(args._worker, args.shape, args.batch_size, args.steps, args.threads)))
        return

    results = {"pmf_loss": [], "straightforward": []}
    for _ in range(args.rounds):
        for variant in ("pmf_loss", "straightforward"):
            command = [sys.executable, __file__, "--shape", args.shape, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--_worker", variant]
            if args.threads:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(output.strip().splitlines()[-1]))

    summary = {}
    for variant, runs in results.items():
        summary[variant] = {
            "median_step_s": statistics.median(t for run in runs for t in run["step_times_s"]),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "peak_rss_over_model_mb": max(run["peak_rss_over_model_mb"] for run in runs),
            "loss": runs[-1]["loss"],
        }
    ours, literal = summary["pmf_loss"], summary["straightforward"]
    speedup = literal["median_step_s"] / ours["median_step_s"]
    loss_diff = abs(ours["loss"] - literal["loss"]) / abs(literal["loss"])
    print(f"shape {args.shape}, batch {args.batch_size}, torch threads {args.threads or torch.get_num_threads()}")
    print("| variant | median step (s) | peak RSS (MB) | RSS over model (MB) | loss |")
    print("|---|---|---|---|---|")
    for variant, row in summary.items():
        print(f"| {variant} | {row['median_step_s']:.3f} | {row['peak_rss_mb']:.0f} | "
              f"{row['peak_rss_over_model_mb']:.0f} | {row['loss']:.7f} |")
    print(f"speed-up of pmf_loss: {speedup:.2f}x; relative loss difference {loss_diff:.1e}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "speedup": speedup, "loss_rel_diff": loss_diff,
                       "runs": results}, handle, indent=2)


if __name__ == "__main__":
    main()
