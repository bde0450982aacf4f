# Copyright 2026 The pmf-diffusers developers. MIT License.
"""One-step inference throughput of the pMF-B/16 network (random weights) on the current machine.

Measures, per batch size:
  * the bare transformer call (fp32, bf16, optionally torch.compile) in images/s and achieved GFLOP/s, against a
    dense-GEMM peak measured in the same run (2048³ matmuls, fp32 and bf16);
  * the pipeline's overhead over the bare transformer call (`PMFPipeline(..., latents=..., output_type="latent")`,
    one step, vs `transformer(...)` with the same inputs);
  * the bf16 deviation from fp32 on the same inputs.
Every timing is a median of `--repeats` calls after warm-up; the variants being compared are called alternately
(round-robin, rotating the order every round) so that load changes on a shared machine hit all of them alike.

Example (what docs/benchmarks.md reports):
  HF_HUB_OFFLINE=1 python benchmarks/bench_inference.py --batch-sizes 1 4 16 --repeats 5 --repeats-large 3 \\
      --profile --output benchmarks/results/inference_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# pMF-B/16 (docs/algorithm.md, "Released sizes") in eval mode: 118,234,240 parameters.
B16_CONFIG = dict(
    sample_size=256, patch_size=16, num_layers=8, num_head_layers=8, num_attention_heads=12, attention_head_dim=64,
    mlp_hidden_dim=2048, with_v_head=False,
)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def build_model(seed: int = 0):
    """pMF-B/16-shaped transformer with random weights. The official init zeroes the residual gates and the output
    layer (blocks would be identities, outputs zero), so those are randomised too: compute is the same either way,
    but the bf16 deviation is only meaningful with non-trivial activations."""
    from pmf_diffusers import PMFTransformer2DModel

    torch.manual_seed(seed)
    model = PMFTransformer2DModel(**B16_CONFIG).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif name.endswith("norm_out.weight") or ".norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif name == "u_proj_out.weight":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(hidden))
            elif name.endswith("bias") and parameter.abs().max() == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def make_inputs(model, batch: int, seed: int = 0) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(1000 + seed)
    shape = (batch, config.in_channels, config.sample_size, config.sample_size)
    return dict(
        hidden_states=torch.randn(shape, generator=generator),
        timestep=torch.ones(batch),
        r_timestep=torch.zeros(batch),
        class_labels=torch.randint(0, config.num_classes, (batch,), generator=generator),
        guidance=torch.full((batch,), 7.5),
        guidance_interval_start=torch.full((batch,), 0.1),
        guidance_interval_end=torch.full((batch,), 0.8),
    )


def analytic_flops(config, batch: int) -> dict:
    """Forward FLOPs (multiply-add = 2) of the u-head path: 2·(matmul weights)·tokens + 4·L²·D attention per block."""
    hidden = config.num_attention_heads * config.attention_head_dim
    grid = config.sample_size // config.patch_size
    patches = grid * grid
    prefix = config.num_class_tokens + config.num_guidance_tokens + 2 * config.num_interval_tokens + config.num_time_tokens
    tokens = prefix + patches
    blocks = config.num_layers + config.num_head_layers
    block_weights = 4 * hidden * hidden + 3 * hidden * config.mlp_hidden_dim
    patch_weights = config.in_channels * config.patch_size**2 * config.bottleneck_dim + config.bottleneck_dim * hidden
    out_weights = hidden * config.patch_size**2 * config.in_channels
    embed_weights = 4 * (config.frequency_embedding_dim * hidden + hidden * hidden)  # per sample, not per token
    matmul = 2 * batch * (blocks * block_weights * tokens + patch_weights * patches + out_weights * patches + embed_weights)
    attention = 4 * batch * blocks * tokens * tokens * hidden
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "tokens": tokens}


def counted_flops(model, inputs) -> int:
    """FLOPs as counted by torch.utils.flop_counter (mm/addmm/bmm/conv/SDPA) for one call."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def alternate(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Call every function `warmup` times, then `repeats` rounds in rotating order; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def gemm_peak(dtype: torch.dtype, size: int, repeats: int) -> dict:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    flops = 2 * size**3
    times = alternate({"mm": lambda: torch.mm(a, b)}, repeats, warmup=2)["mm"]
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "seconds": times,
            "gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9}


def kernel_ceiling(config, batch: int, fused_qkv: bool, gemm_operands, gemm_calls: int, repeats: int) -> dict:
    """What the blocks' own kernels allow: each GEMM shape of a block and the attention kernel timed in isolation
    (inputs in cache, nothing else running), in rotation with the 2048³ GEMM reference.

    The resulting "kernel ceiling" is the blocks' FLOPs over the sum of those isolated kernel times: the GFLOP/s the
    model would reach if every norm, gate, RoPE, copy and framework call were free. It separates "the GEMMs of this
    shape are slower than a 2048³ GEMM" from "time goes outside the GEMMs"."""
    import torch.nn.functional as F

    hidden = config.num_attention_heads * config.attention_head_dim
    tokens = analytic_flops(config, batch)["tokens"]
    rows = batch * tokens
    blocks = config.num_layers + config.num_head_layers
    projections = [(hidden, 3 * hidden, 1), (hidden, hidden, 1)] if fused_qkv else [(hidden, hidden, 4)]
    shapes = projections + [(hidden, config.mlp_hidden_dim, 2), (config.mlp_hidden_dim, hidden, 1)]
    kernels, flops_per_block = {}, {}
    for fan_in, fan_out, count in shapes:
        x, weight = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in)
        name = f"linear {rows}x{fan_in}->{fan_out} (x{count})"
        kernels[name] = lambda x=x, weight=weight: F.linear(x, weight)
        flops_per_block[name] = (2 * rows * fan_in * fan_out, count)
    qkv = [torch.randn(batch, config.num_attention_heads, tokens, config.attention_head_dim) for _ in range(3)]
    kernels["attention (SDPA)"] = lambda: F.scaled_dot_product_attention(*qkv)
    flops_per_block["attention (SDPA)"] = (4 * batch * tokens * tokens * hidden, 1)
    a, b = gemm_operands
    kernels["gemm_reference"] = lambda: [torch.mm(a, b) for _ in range(gemm_calls)]
    with torch.inference_mode():
        times = alternate(kernels, repeats, warmup=2)
    medians = {name: statistics.median(values) for name, values in times.items()}
    peak = 2 * a.shape[0] ** 3 * gemm_calls / medians.pop("gemm_reference") / 1e9
    block_seconds = sum(medians[name] * count for name, (_, count) in flops_per_block.items())
    block_flops = sum(flops * count for flops, count in flops_per_block.values())
    ceiling = block_flops / block_seconds / 1e9
    return {
        "gemm_peak_gflops": peak,
        "kernel_gflops": {name: flops_per_block[name][0] / medians[name] / 1e9 for name in flops_per_block},
        "ceiling_gflops": ceiling,
        "ceiling_percent_of_gemm_peak": 100 * ceiling / peak,
        "blocks_share_of_flops": blocks * block_flops / analytic_flops(config, batch)["total"],
    }


def profile_forward(model, inputs, top: int = 15) -> dict:
    """Where one forward call spends its time (self CPU time per aten op, grouped)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"GEMM (linear/mm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
              "attention kernel (SDPA)": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
              "conv (patch embed)": ("conv", "mkldnn"),
              "copies/layout (cat, stack, contiguous, to)": ("aten::cat", "aten::stack", "aten::copy_", "aten::clone",
                                                              "aten::contiguous", "aten::_to_copy", "aten::to")}
    grouped = {name: 0.0 for name in groups}
    grouped["elementwise/other (norms, RoPE, SiLU, gates, adds)"] = 0.0
    for event in events:
        for name, patterns in groups.items():
            if any(pattern in event.key for pattern in patterns):
                grouped[name] += event.self_cpu_time_total
                break
        else:
            grouped["elementwise/other (norms, RoPE, SiLU, gates, adds)"] += event.self_cpu_time_total
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "total_ms": total / 1e3,
        "groups_percent": {name: 100 * value / total for name, value in grouped.items()},
        "top_ops": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                     "percent": 100 * e.self_cpu_time_total / total} for e in ops],
    }


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    except (OSError, StopIteration):
        pass
    info["mkldnn_bf16"] = torch.backends.mkldnn.is_available()
    return info


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--repeats-large", type=int, default=3, help="timed rounds for batch sizes ≥ 16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16-mode", choices=["cast", "autocast", "none"], default="cast",
                        help="cast: a bf16 copy of the model (pipe.transformer.to(torch.bfloat16)); autocast: fp32 "
                             "model under torch.autocast('cpu', bfloat16); none: skip bf16")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(transformer) in fp32 (of the fused model with --fuse-qkv)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune", "reduce-overhead"],
                        help="torch.compile mode for --compile")
    parser.add_argument("--freezing", action="store_true",
                        help="with --compile: torch._inductor.config.freezing = True (inference-only constant weights)")
    parser.add_argument("--batch-chunk", type=int, default=None,
                        help="also time fp32 eager with transformer.enable_batch_chunking(N); the compiled model "
                             "(--compile) is chunked too")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="also time fp32 with fused QKV projections (transformer.fuse_qkv_projections())")
    parser.add_argument("--kernel-ceiling", action="store_true",
                        help="also time each GEMM shape of a block and the attention kernel in isolation (the "
                             "model's ceiling if everything else were free; uses the fused shapes with --fuse-qkv)")
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--gemm-repeats", type=int, default=10)
    parser.add_argument("--gemm-calls-per-round", type=int, default=5,
                        help="GEMMs timed as one block in each rotation round (the in-rotation peak)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one fp32 call at batch 1")
    parser.add_argument("--output", type=Path, help="write all numbers as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pmf_diffusers import PMFPipeline, PMFScheduler

    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
               "loadavg_start": os.getloadavg(), "config": B16_CONFIG, "bf16_mode": args.bf16_mode, "rows": []}
    print(f"# machine: {results['machine']}", flush=True)

    peaks = {"float32": gemm_peak(torch.float32, args.gemm_size, args.gemm_repeats)}
    if args.bf16_mode != "none":
        peaks["bfloat16"] = gemm_peak(torch.bfloat16, args.gemm_size, args.gemm_repeats)
    for name, peak in peaks.items():
        print(f"# GEMM {args.gemm_size}³ {name}: {peak['gflops_median']:.1f} GFLOP/s median "
              f"({peak['gflops_best']:.1f} best)", flush=True)

    gemm_operands = {"float32": (torch.randn(args.gemm_size, args.gemm_size), torch.randn(args.gemm_size, args.gemm_size))}
    if args.bf16_mode != "none":
        gemm_operands["bfloat16"] = tuple(t.bfloat16() for t in gemm_operands["float32"])

    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    results["params"] = params
    pipe = PMFPipeline(model, PMFScheduler(noise_scale=1.0))
    pipe.set_progress_bar_config(disable=True)
    bf16_model = None
    if args.bf16_mode == "cast":
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    fused_model = None
    if args.fuse_qkv:
        fused_model = copy.deepcopy(model)
        fused_model.fuse_qkv_projections()
    chunked_model = None
    if args.batch_chunk:
        chunked_model = copy.deepcopy(model)
        chunked_model.enable_batch_chunking(args.batch_chunk)
    compiled = None
    if args.compile:
        # With --fuse-qkv the fused model is the one compiled (the fastest eager configuration).
        if args.freezing:
            # Inference-only compile: weights become constants, so inductor pre-packs them for oneDNN and folds
            # what depends only on them (the model must not be trained afterwards).
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        to_compile = copy.deepcopy(fused_model if fused_model is not None else model)
        if args.batch_chunk:
            to_compile.enable_batch_chunking(args.batch_chunk)
        # Static shapes: each batch size gets its own graph (no dynamic-shape recompile).
        compiled = torch.compile(to_compile, mode=args.compile_mode, dynamic=False)
        results["compiled_model"] = {"model": "fused_qkv" if fused_model is not None else "plain",
                                     "mode": args.compile_mode, "freezing": args.freezing,
                                     "batch_chunk": args.batch_chunk}
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(**make_inputs(model, args.batch_sizes[0]))
        results["compile_seconds_first_batch"] = time.perf_counter() - start
        print(f"# torch.compile warm-up (batch {args.batch_sizes[0]}): {results['compile_seconds_first_batch']:.1f} s")

    flop_check = make_inputs(model, 1)
    results["flops_per_image"] = {"analytic": analytic_flops(model.config, 1),
                                  "flop_counter": counted_flops(model, flop_check)}
    print(f"# FLOPs per image: analytic {results['flops_per_image']['analytic']['total'] / 1e9:.2f} G, "
          f"FlopCounterMode {results['flops_per_image']['flop_counter'] / 1e9:.2f} G; params {params:,}", flush=True)
    if args.profile:
        results["profile_fp32_batch1"] = profile_forward(model, flop_check)
        if bf16_model is not None:
            bf16_inputs = {**flop_check, "hidden_states": flop_check["hidden_states"].bfloat16()}
            results["profile_bf16_batch1"] = profile_forward(bf16_model, bf16_inputs)

    for batch in args.batch_sizes:
        inputs = make_inputs(model, batch)
        repeats = args.repeats_large if batch >= 16 else args.repeats
        labels = inputs["class_labels"].tolist()

        def run_transformer(m=model, x=inputs):
            with torch.inference_mode():
                return m(**x, return_dict=False)[0]

        def run_pipeline():
            return pipe(labels, num_inference_steps=1, guidance_scale=7.5, guidance_interval=(0.1, 0.8),
                        latents=inputs["hidden_states"], output_type="latent").images

        fns = {"transformer_fp32": run_transformer, "pipeline_fp32": run_pipeline}
        if args.bf16_mode == "cast":
            bf16_inputs = {**inputs, "hidden_states": inputs["hidden_states"].bfloat16()}
            fns["transformer_bf16"] = lambda: run_transformer(bf16_model, bf16_inputs)
        elif args.bf16_mode == "autocast":
            def run_autocast():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return run_transformer()
            fns["transformer_bf16"] = run_autocast
        if compiled is not None:
            fns["transformer_fp32_compiled"] = lambda: run_transformer(compiled)
        if fused_model is not None:
            fns["transformer_fp32_fused_qkv"] = lambda: run_transformer(fused_model)
        if chunked_model is not None:
            fns["transformer_fp32_chunked"] = lambda: run_transformer(chunked_model)
        # The GEMM peak is timed inside the same rotation, so that it sees the same machine load as the model.
        # A block of several GEMMs per round, so that the reference spans a window comparable to a model call.
        for dtype_name, (a, b) in gemm_operands.items():
            fns[f"gemm_{dtype_name}"] = lambda a=a, b=b: [torch.mm(a, b) for _ in range(args.gemm_calls_per_round)]

        print(f"# batch {batch}: {repeats} rounds of {list(fns)}", flush=True)
        times = alternate(fns, repeats, args.warmup)
        medians = {name: statistics.median(values) for name, values in times.items()}
        flops = analytic_flops(model.config, batch)["total"]
        row = {"batch": batch, "repeats": repeats, "seconds": times, "median_s": medians, "flops": flops}
        row["images_per_s"] = {name: batch / value for name, value in medians.items() if not name.startswith("gemm_")}
        row["gflops"] = {name: flops / value / 1e9 for name, value in medians.items() if name.startswith("transformer")}
        gemm_flops = 2 * args.gemm_size**3 * args.gemm_calls_per_round
        row["gemm_gflops"] = {name[5:]: gemm_flops / medians[name] / 1e9 for name in medians if name.startswith("gemm_")}
        row["fp32_percent_of_gemm_peak"] = 100 * row["gflops"]["transformer_fp32"] / row["gemm_gflops"]["float32"]
        # Efficiency per round (model and GEMM timed back to back), then the median: robust to slow load drifts.
        for name in [n for n in times if n.startswith("transformer_fp32")]:
            row[f"{name}_percent_of_gemm_peak_paired"] = 100 * statistics.median(
                (flops / t) / (gemm_flops / g) for t, g in zip(times[name], times["gemm_float32"]))
        row["pipeline_overhead_percent"] = 100 * (medians["pipeline_fp32"] / medians["transformer_fp32"] - 1)
        # The same A/B comparison per round (robust to load drifting between rounds).
        row["pipeline_overhead_percent_paired"] = 100 * (statistics.median(
            p / t for p, t in zip(times["pipeline_fp32"], times["transformer_fp32"])) - 1)
        # Same inputs through both: the one-step sample is z − (1 − 0)·(z − x̂) = x̂ up to fp32 rounding.
        reference = run_transformer()
        row["pipeline_vs_transformer_max_abs"] = float((run_pipeline() - reference).abs().max())
        # The pipeline's own work, isolated: the same call with the network replaced by a stub returning `reference`
        # (robust to load noise, which on a shared machine can exceed the whole overhead in the A/B medians).
        model.forward = lambda *args, **kwargs: (reference,)
        try:
            stub = alternate({"pipeline_stub": run_pipeline}, 20, warmup=2)["pipeline_stub"]
        finally:
            del model.forward
        row["pipeline_own_ms"] = 1e3 * statistics.median(stub)
        row["pipeline_own_percent"] = 100 * statistics.median(stub) / medians["transformer_fp32"]
        if "transformer_bf16" in fns:
            row["bf16_speedup"] = medians["transformer_fp32"] / medians["transformer_bf16"]
            if "bfloat16" in row["gemm_gflops"]:
                row["bf16_percent_of_gemm_peak"] = 100 * row["gflops"]["transformer_bf16"] / row["gemm_gflops"]["bfloat16"]
            out = fns["transformer_bf16"]().float()
            diff = (out - reference).abs()
            row["bf16_max_abs_dev"] = float(diff.max())
            row["bf16_max_rel_dev"] = float(diff.max() / reference.abs().max())
            row["bf16_mean_rel_dev"] = float(diff.mean() / reference.abs().mean())
        if fused_model is not None:
            row["fp32_fused_qkv_percent_of_gemm_peak"] = (
                100 * row["gflops"]["transformer_fp32_fused_qkv"] / row["gemm_gflops"]["float32"])
            row["fused_qkv_speedup"] = medians["transformer_fp32"] / medians["transformer_fp32_fused_qkv"]
            row["fused_qkv_speedup_paired"] = statistics.median(
                u / f for u, f in zip(times["transformer_fp32"], times["transformer_fp32_fused_qkv"]))
            row["fused_qkv_max_abs_dev"] = float((run_transformer(fused_model) - reference).abs().max())
        if chunked_model is not None:
            row["chunked_speedup_paired"] = statistics.median(
                u / c for u, c in zip(times["transformer_fp32"], times["transformer_fp32_chunked"]))
            row["chunked_max_abs_dev"] = float((run_transformer(chunked_model) - reference).abs().max())
        if compiled is not None:
            row["compile_speedup"] = medians["transformer_fp32"] / medians["transformer_fp32_compiled"]
            row["fp32_compiled_percent_of_gemm_peak"] = (
                100 * row["gflops"]["transformer_fp32_compiled"] / row["gemm_gflops"]["float32"])
            row["compile_max_abs_dev"] = float((run_transformer(compiled) - reference).abs().max())
        if args.kernel_ceiling:
            row["kernel_ceiling"] = kernel_ceiling(model.config, batch, args.fuse_qkv, gemm_operands["float32"],
                                                   args.gemm_calls_per_round, repeats=max(repeats, 5))
            ceiling = row["kernel_ceiling"]
            print(f"#   kernel ceiling: {ceiling['ceiling_gflops']:.0f} GFLOP/s = "
                  f"{ceiling['ceiling_percent_of_gemm_peak']:.0f}% of the GEMM peak of its rounds "
                  f"({ceiling['gemm_peak_gflops']:.0f}); kernels: "
                  f"{ {k: round(v) for k, v in ceiling['kernel_gflops'].items()} }", flush=True)
        results["rows"].append(row)
        print(f"#   medians (s): { {k: round(v, 4) for k, v in medians.items()} }", flush=True)

    # Peak again at the end: on a shared machine the load may have changed during the run.
    peaks["float32_end"] = gemm_peak(torch.float32, args.gemm_size, args.gemm_repeats)
    results["gemm_peak"] = peaks
    # The most conservative reference: the best fp32 GEMM throughput seen anywhere in the run.
    best_rotation = max(2 * args.gemm_size**3 * args.gemm_calls_per_round / min(row["seconds"]["gemm_float32"]) / 1e9
                        for row in results["rows"])
    results["fp32_gemm_best_gflops"] = max(best_rotation, peaks["float32"]["gflops_best"], peaks["float32_end"]["gflops_best"])
    for row in results["rows"]:
        for name in [n for n in row["gflops"] if n.startswith("transformer_fp32")]:
            best_call = row["flops"] / min(row["seconds"][name]) / 1e9
            row[f"{name}_best_percent_of_best_gemm"] = 100 * best_call / results["fp32_gemm_best_gflops"]
    results["loadavg_end"] = os.getloadavg()

    print()
    print(render_table(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.output}")
    return 0


def render_table(results: dict) -> str:
    peaks = results["gemm_peak"]
    fused = any("fused_qkv_speedup" in row for row in results["rows"])
    compiled = any("compile_speedup" in row for row in results["rows"])
    lines = [
        f"GEMM peak ({peaks['float32']['size']}³, median; separate runs at start / end): fp32 "
        f"{peaks['float32']['gflops_median']:.0f} / {peaks['float32_end']['gflops_median']:.0f} GFLOP/s"
        + (f", bf16 {peaks['bfloat16']['gflops_median']:.0f} GFLOP/s (start)" if "bfloat16" in peaks else "")
        + f"; threads {results['machine']['threads']}; load average start {results['loadavg_start'][0]:.1f}, "
        f"end {results['loadavg_end'][0]:.1f}",
        f"FLOPs per image: {results['flops_per_image']['analytic']['total'] / 1e9:.2f} G (analytic), "
        f"{results['flops_per_image']['flop_counter'] / 1e9:.2f} G (FlopCounterMode); bf16 = {results['bf16_mode']}; "
        f"best fp32 GEMM seen in the run {results['fp32_gemm_best_gflops']:.0f} GFLOP/s",
        "",
        "| batch | fp32 img/s | fp32 GFLOP/s | GEMM peak fp32 / bf16 (same rounds) | fp32 % of GEMM peak (medians; per-round; best vs best) | pipeline overhead | bf16 img/s | bf16 speed-up "
        "| bf16 % of bf16 peak | bf16 max abs / rel dev |"
        + (" fused-QKV fp32 img/s (% of GEMM peak ×3; speed-up, paired) |" if fused else "")
        + (" compiled fp32 img/s (% of GEMM peak; speed-up) |" if compiled else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (fused + compiled),
    ]
    for row in results["rows"]:
        ips = row["images_per_s"]
        cells = [
            str(row["batch"]), f"{ips['transformer_fp32']:.2f}", f"{row['gflops']['transformer_fp32']:.0f}",
            " / ".join(f"{value:.0f}" for value in row["gemm_gflops"].values()),
            f"{row['fp32_percent_of_gemm_peak']:.0f}%; {row['transformer_fp32_percent_of_gemm_peak_paired']:.0f}%; "
            f"{row['transformer_fp32_best_percent_of_best_gemm']:.0f}%",
            f"{row['pipeline_overhead_percent']:+.1f}% (paired {row['pipeline_overhead_percent_paired']:+.1f}%; "
            f"own work {row['pipeline_own_ms']:.2f} ms = {row['pipeline_own_percent']:.2f}%)",
        ]
        if "bf16_speedup" in row:
            cells += [f"{ips['transformer_bf16']:.2f}", f"{row['bf16_speedup']:.2f}×",
                      f"{row.get('bf16_percent_of_gemm_peak', float('nan')):.0f}%",
                      f"{row['bf16_max_abs_dev']:.3g} / {row['bf16_max_rel_dev']:.2%}"]
        else:
            cells += ["–"] * 4
        if "fused_qkv_speedup" in row:
            cells.append(f"{ips['transformer_fp32_fused_qkv']:.2f} ({row['fp32_fused_qkv_percent_of_gemm_peak']:.0f}%; "
                         f"{row['transformer_fp32_fused_qkv_percent_of_gemm_peak_paired']:.0f}%; "
                         f"{row['transformer_fp32_fused_qkv_best_percent_of_best_gemm']:.0f}%; "
                         f"{row['fused_qkv_speedup']:.2f}×, {row['fused_qkv_speedup_paired']:.2f}×)")
        if "compile_speedup" in row:
            cells.append(f"{ips['transformer_fp32_compiled']:.2f} ({row['fp32_compiled_percent_of_gemm_peak']:.0f}%; "
                         f"{row['compile_speedup']:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    for row in results["rows"]:
        if "chunked_speedup_paired" in row:
            lines.append(
                f"batch {row['batch']}, eager fp32 with enable_batch_chunking: "
                f"{row['images_per_s']['transformer_fp32_chunked']:.2f} img/s "
                f"({row['transformer_fp32_chunked_percent_of_gemm_peak_paired']:.0f}% of the GEMM peak per-round; "
                f"{row['chunked_speedup_paired']:.2f}× paired; max abs dev {row['chunked_max_abs_dev']:.1e})")
    for key in ("profile_fp32_batch1", "profile_bf16_batch1"):
        if key in results:
            profile = results[key]
            lines += ["", f"{key}: {profile['total_ms']:.0f} ms of op self time"]
            lines += [f"  {name}: {value:.1f}%" for name, value in profile["groups_percent"].items()]
            lines += [f"  {op['op']}: {op['percent']:.1f}% ({op['calls']} calls)" for op in profile["top_ops"][:10]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
