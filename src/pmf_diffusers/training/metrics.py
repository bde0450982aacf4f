# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Training statistics without host syncs in the step: accumulated on the device, read at logging steps.

Reading a CUDA tensor on the host (`.item()`, `float(t)`, `if t:`) waits for every queued kernel, so a per-step
read stalls the host from queueing the next step. [`StepMetrics`] keeps the per-micro-step losses and a non-finite
flag (with the first step it was raised at) as device tensors, and the image counts as host integers; one gather
and one `.tolist()` at a logging step turn them into the logged values, averaged over the steps since the previous
log. [`MetricsFile`] is `logs/metrics.jsonl`, cut back to the checkpoint's step when a run resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["LOSS_NAMES", "MetricsFile", "SkippedImages", "StepMetrics"]

LOSS_NAMES = ("loss", "loss_u", "loss_v", "loss_lpips", "loss_convnext")


class StepMetrics:
    """Device-side sums of the losses of `pmf_loss` outputs (see the module docstring).

    Per micro-step, [`add`] costs a `torch.stack` and two element-wise ops on the device and no host sync;
    [`collect`] (at logging steps; collective) returns the averages over processes and micro-steps and the summed host
    counts, and [`first_non_finite_step`] (before a checkpoint is saved; collective) the first step whose loss was NaN
    or infinite on any process.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.first_bad_step = torch.full((), math.inf, device=self.device)
        self._reset_window()

    def _reset_window(self) -> None:
        self.sums: torch.Tensor | None = None
        self.micro_steps = 0
        self.counts: dict[str, float] = {}
        self.window_start = time.perf_counter()

    def add(self, output, step: int, **counts: float) -> None:
        """Add one micro-step: `output` a `PMFLossOutput` of optimizer step `step` (1-based); `counts` host numbers
        (images, skipped files, ...) summed over the window and the processes by [`collect`]."""
        values = torch.stack([getattr(output, name).detach().float() for name in LOSS_NAMES])
        self.sums = values if self.sums is None else self.sums + values
        self.first_bad_step = torch.where(
            torch.isfinite(values[0]), self.first_bad_step, self.first_bad_step.clamp(max=float(step))
        )
        self.micro_steps += 1
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value

    def first_non_finite_step(self, accelerator) -> tuple[int | None, int]:
        """(first step with a non-finite loss on any process or None, number of such processes). Collective; a sync."""
        firsts = accelerator.gather(self.first_bad_step.reshape(1)).tolist()
        bad = [value for value in firsts if math.isfinite(value)]
        return (int(min(bad)) if bad else None), len(bad)

    def collect(self, accelerator, **host_values: float) -> dict[str, float]:
        """The window's averages (`LOSS_NAMES`), `img_per_sec` (from the `images` count) and the sums over processes
        of the counts and of `host_values` (e.g. a time-budget flag), plus `first_bad_step` / `bad_processes`; then
        a new window starts. Collective; one gather and one device→host copy."""
        names = sorted(set(self.counts) | set(host_values))
        host = [self.counts.get(name, 0) + host_values.get(name, 0) for name in names]
        sums = self.sums if self.sums is not None else torch.zeros(len(LOSS_NAMES), device=self.device)
        local = torch.cat([sums / max(self.micro_steps, 1), self.first_bad_step.reshape(1),
                           torch.tensor(host, dtype=torch.float32).to(self.device)])
        rows = accelerator.gather(local.unsqueeze(0)).tolist()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        result = {name: sum(row[i] for row in rows) / len(rows) for i, name in enumerate(LOSS_NAMES)}
        bad = [row[len(LOSS_NAMES)] for row in rows if math.isfinite(row[len(LOSS_NAMES)])]
        result.update(first_bad_step=int(min(bad)) if bad else None, bad_processes=len(bad))
        offset = len(LOSS_NAMES) + 1
        result.update({name: sum(row[offset + i] for row in rows) for i, name in enumerate(names)})
        if "images" in result:
            result["img_per_sec"] = result["images"] / elapsed
        self._reset_window()
        return result


class SkippedImages:
    """The images the collator dropped from their batches (`batch["corrupt"]`: unreadable, `batch["too_small"]`:
    smaller than the resolution): each file is reported once per process when first met, and counted."""

    KINDS = {"corrupt": "unreadable image", "too_small": "image"}

    def __init__(self):
        self.seen: dict[str, dict[str, int]] = {kind: {} for kind in self.KINDS}  # path -> times met, this process
        self.total = {kind: 0 for kind in self.KINDS}  # over all processes, as logged

    def note(self, batch: dict) -> None:
        for kind, label in self.KINDS.items():
            for path, reason in batch[kind]:
                if path not in self.seen[kind]:
                    logger.warning(f"Skipping {label} {path}: {reason}")
                self.seen[kind][path] = self.seen[kind].get(path, 0) + 1

    def add_totals(self, collected: dict) -> dict[str, int]:
        """Add the counts of a [`StepMetrics.collect`] result; the logged totals `{"corrupt_images", ...}`."""
        for kind in self.KINDS:
            self.total[kind] += int(collected.get(kind, 0))
        return {f"{kind}_images": total for kind, total in self.total.items()}

    def report(self, process_index: int) -> None:
        for kind, seen in self.seen.items():
            if seen:
                logger.warning(f"Skipped {sum(seen.values())} {'unreadable' if kind == 'corrupt' else 'too small'} "
                               f"image read(s) ({len(seen)} distinct file(s)) on process {process_index}: "
                               f"{sorted(seen)[:10]}")


class MetricsFile:
    """`logs/metrics.jsonl`: one JSON line per logged step, written by the main process."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the lines of steps after `step` (logged after the checkpoint a run resumes from, and logged again by
        the resumed run) and a partial last line (a killed run); returns how many lines were dropped."""
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1
                continue
            if record_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped
