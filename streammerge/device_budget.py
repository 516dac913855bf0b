"""``--gpu-memory``: which tensors of a CUDA merge run on the CPU because their working set does not fit.

The plan estimates each tensor's working set on the compute device (``MergePlan.tensor_working_set``);
with ``--device cuda`` a tensor over the budget (default: the device's total memory) is computed on the
CPU instead, and the run's report names those tensors. The decision depends only on the plan and the
budget, so every rank of a distributed merge makes the same one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .errors import StreamMergeError
from .planner import fmt_bytes, parse_size

if TYPE_CHECKING:
    from .engine import MergeOptions
    from .planner import MergePlan, PlannedTensor


def resolve_gpu_memory(device: torch.device, budget: int | str | None) -> int | None:
    """``--gpu-memory``: bytes (``8GB``), or by default what the CUDA device reports; refused off CUDA."""
    if device.type != "cuda":
        if budget is not None:
            raise StreamMergeError(
                f"--gpu-memory {budget}: the merge runs on the CPU here ({device}); it applies to --device cuda only"
            )
        return None
    if budget is None:
        return torch.cuda.get_device_properties(device).total_memory
    return parse_size(budget)


def tensor_options(plan: MergePlan, tensor: PlannedTensor, options: MergeOptions) -> MergeOptions:
    """``options`` for one tensor: its device is the CPU when its working set does not fit ``gpu_memory``."""
    if options.gpu_memory is None or options.device.type != "cuda":
        return options
    if plan.tensor_working_set(tensor) <= options.gpu_memory:
        return options
    return replace(options, device=torch.device("cpu"))


def gpu_memory_report(plan: MergePlan, options: MergeOptions) -> list[str]:
    """The line saying which tensors run on the CPU because they do not fit ``--gpu-memory`` (if any)."""
    over = [t for t in plan.tensors if t.merged and tensor_options(plan, t, options) is not options]
    if not over:
        return []
    biggest = max(over, key=plan.tensor_working_set)
    return [
        f"{len(over)} tensor(s) ran on the CPU: their working set exceeds --gpu-memory {fmt_bytes(options.gpu_memory)} "
        f"(largest: {biggest.out.name}, ~{fmt_bytes(plan.tensor_working_set(biggest))}): "
        + ", ".join(t.out.name for t in over[:5]) + (" ..." if len(over) > 5 else "")
    ]
