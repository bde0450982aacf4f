"""The softmax attention of the explicit u-head JVP: eager ("explicit") against `torch.compile`d ("compiled").

Two measurements on the same random model and inputs, the two modes alternating round by round:

* core: `training.jvp.softmax_attention_jvp` alone on (batch, heads, tokens, head_dim) tensors, the shape of one
  block's attention (the score matrix and its tangent are what the compiled form fuses);
* u_head_jvp: the whole no-grad JVP of `pmf_loss` (trunk + u-head, every block), so the core's share shows.

The first call of the compiled mode compiles (its time is reported apart); the results of the two modes are compared.

    python benchmarks/bench_jvp_attention.py --shape tiny --batch-size 8
    python benchmarks/bench_jvp_attention.py --shape B/16 --batch-size 2 --threads 2 --output bench_jvp_attention.json

docs/benchmarks.md ("JVP attention") has the results; benchmarks/gpu_check.py measures the same option in a full
training step on a GPU.
"""

import argparse
import json
import statistics
import time

import torch

from bench_train import SHAPES  # tinyA's shape and pMF-B/16 (12 heads of 64, 276 tokens at 256 px)
from pmf_diffusers import PMFTransformer2DModel
from pmf_diffusers.training.jvp import (
    JVP_ATTENTION_MODES,
    compiled_softmax_attention_jvp,
    softmax_attention_jvp,
    u_head_jvp,
)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(name: str, calls: dict, rounds: int) -> dict:
    """First call and `rounds` timed calls of each mode (interleaved), and the modes' worst relative difference."""
    first, outputs = {}, {}
    for mode, fn in calls.items():
        first[mode], outputs[mode] = timed(fn)
    times = {mode: [] for mode in calls}
    for _ in range(rounds):
        for mode, fn in calls.items():
            times[mode].append(timed(fn)[0])
    medians = {mode: statistics.median(seconds) for mode, seconds in times.items()}
    explicit, compiled = outputs["explicit"], outputs["compiled"]
    return {
        "measurement": name,
        "median_s": medians,
        "min_s": {mode: min(seconds) for mode, seconds in times.items()},
        "first_call_s": first,
        "speedup_of_compiled": medians["explicit"] / medians["compiled"],
        "max_rel_diff": max(max_rel_err(c, e) for c, e in zip(compiled, explicit)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per mode (after one untimed first call)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = SHAPES[args.shape]
    model = PMFTransformer2DModel(**config)
    with torch.no_grad():  # random, non-degenerate weights: the official init zeroes the gates and output layers
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    batch, size = args.batch_size, config["sample_size"]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    tokens = (size // config["patch_size"]) ** 2 + model.num_prefix_tokens

    # (B, L, H, D) viewed as (B, H, L, D), as `attention_jvp` passes them
    core_inputs = [torch.randn(batch, tokens, heads, head_dim).transpose(1, 2) for _ in range(6)]
    z, t = torch.randn(batch, 3, size, size), torch.rand(batch)
    conditions = (torch.randint(0, config["num_classes"], (batch,)), torch.full((batch,), 3.0), torch.zeros(batch),
                  torch.ones(batch))
    tangents = (torch.randn_like(z), torch.ones(batch), torch.zeros(batch))
    compiled_core = compiled_softmax_attention_jvp()  # what attention="compiled" runs in every block
    results = []
    with torch.no_grad():
        results.append(compare("core", {"explicit": lambda: softmax_attention_jvp(*core_inputs),
                                        "compiled": lambda: compiled_core(*core_inputs)}, args.rounds))
        results.append(compare("u_head_jvp", {
            mode: (lambda mode=mode: u_head_jvp(model, (z, t, 0.5 * t), tangents, *conditions, attention=mode))
            for mode in JVP_ATTENTION_MODES}, args.rounds))

    print(f"shape {args.shape}, batch {batch}, attention (B, H, L, D) = ({batch}, {heads}, {tokens}, {head_dim}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| measurement | explicit median s | compiled median s | speed-up of compiled | compiled first call s "
          "| max rel diff |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['measurement']} | {row['median_s']['explicit']:.4f} | {row['median_s']['compiled']:.4f} | "
              f"{row['speedup_of_compiled']:.2f}× | {row['first_call_s']['compiled']:.1f} | "
              f"{row['max_rel_diff']:.1e} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "attention_shape": [batch, heads, tokens, head_dim], "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
