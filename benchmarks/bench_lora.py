"""LoRA vs full fine-tuning of the pMF-B/16 training network: trainable parameters, optimizer state, step time and
peak memory.

One step = `pmf_loss` (perceptual weights 0) + backward + AdamW step, on random images in [-1, 1]. Variants:

* `full`: every parameter trainable (the base is fine-tuned as is).
* `lora`: `add_pmf_lora(rank=16, targets="attention+mlp")` (trunk, u-head and v-head), base frozen.

Each variant runs in a fresh subprocess (so peak RSS is per variant); variants alternate A/B across rounds and the
median step time is reported. Parameter and optimizer-state counts are exact (the bytes held by AdamW's state after
its first step).

    python benchmarks/bench_lora.py --shape tiny --steps 3
    python benchmarks/bench_lora.py --shape B/16 --batch-size 1 --steps 2 --rounds 2 --output bench_lora.json
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
    "tiny": dict(sample_size=32, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2,
                 attention_head_dim=16, mlp_hidden_dim=64, bottleneck_dim=16, num_classes=4),
    # The pMF-B/16 training network (with its v-head).
    "B/16": dict(sample_size=256, patch_size=16, num_layers=8, num_head_layers=8, num_attention_heads=12,
                 attention_head_dim=64, mlp_hidden_dim=2048, num_classes=1000),
}


def run_variant(variant: str, shape: str, batch_size: int, steps: int, rank: int, targets: str, device: str,
                threads: int | None) -> dict:
    from pmf_diffusers import PMFTransformer2DModel
    from pmf_diffusers.training.lora import add_pmf_lora
    from pmf_diffusers.training import PMFLossConfig, pmf_loss, sample_draws

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PMFTransformer2DModel(**SHAPES[shape], with_v_head=True)
    with torch.no_grad():  # non-degenerate weights (the official init zeroes the gates and output layers)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    total_params = sum(p.numel() for p in model.parameters())
    if variant == "lora":
        add_pmf_lora(model, rank=rank, targets=targets)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    config = PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0)
    size = model.config.sample_size
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, model.config.num_classes, (batch_size,), generator=generator).to(device)
    draws = sample_draws(batch_size, config, generator, (3, size, size), device)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for _ in range(steps + 1):  # the first step is warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = pmf_loss(model, images, labels, config, draws=draws).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    optimizer_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "variant": variant,
        "total_params": total_params,
        "trainable_params": trainable,
        "optimizer_state_mb": optimizer_bytes / 2**20,
        "gradient_mb": trainable * 4 / 2**20,
        "step_times_s": times[1:],
        "losses": losses,
        "peak_rss_mb": peak_rss / 1024,
        "peak_rss_over_model_mb": (peak_rss - baseline_rss) / 1024,
    }
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B alternations (each in fresh processes)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attention+mlp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        result = run_variant(args._worker, args.shape, args.batch_size, args.steps, args.rank, args.targets,
                             args.device, args.threads)
        print(json.dumps(result))
        return

    results = {"full": [], "lora": []}
    for round_index in range(args.rounds):
        order = ("full", "lora") if round_index % 2 == 0 else ("lora", "full")
        for variant in order:
            command = [sys.executable, __file__, "--shape", args.shape, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--rank", str(args.rank), "--targets", args.targets,
                       "--device", args.device, "--_worker", variant]
            if args.threads:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(output.strip().splitlines()[-1]))
            print(f"round {round_index} {variant}: {results[variant][-1]['step_times_s']}", file=sys.stderr)

    summary = {}
    for variant, runs in results.items():
        row = {
            "trainable_params": runs[0]["trainable_params"],
            "total_params": runs[0]["total_params"],
            "optimizer_state_mb": runs[0]["optimizer_state_mb"],
            "gradient_mb": runs[0]["gradient_mb"],
            "median_step_s": statistics.median(t for run in runs for t in run["step_times_s"]),
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
            "peak_rss_over_model_mb": statistics.median(run["peak_rss_over_model_mb"] for run in runs),
        }
        if "peak_cuda_mb" in runs[0]:
            row["peak_cuda_mb"] = statistics.median(run["peak_cuda_mb"] for run in runs)
        summary[variant] = row

    print(f"shape {args.shape}, batch {args.batch_size}, device {args.device}, "
          f"torch threads {args.threads or torch.get_num_threads()}, LoRA rank {args.rank} ({args.targets})")
    print("| variant | trainable params | optimizer state (MB) | gradients (MB) | median step (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for variant, row in summary.items():
        share = 100 * row["trainable_params"] / row["total_params"]
        print(f"| {variant} | {row['trainable_params']:,} ({share:.2f}%) | {row['optimizer_state_mb']:.1f} | "
              f"{row['gradient_mb']:.1f} | {row['median_step_s']:.2f} | {row['peak_rss_mb']:.0f} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "runs": results}, handle, indent=2)


if __name__ == "__main__":
    main()
