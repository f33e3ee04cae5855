"""Plumbing: where training runs — the device, processes (DDP), precision, data workers, compile, memory.

Nothing here changes what is computed, only where and how fast: train.py's loop asks `processes`
which tasks of a meta-batch are this process's, `autocast` for the resolved precision, and
`check_memory` before a run starts whether its expert masks fit. evaluate.py picks its device here.
"""

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

import smat
from cli import RunError
from smat import SMAT, Config


def pick_device(device: str) -> torch.device:
    """auto, cpu, cuda or cuda:N of a GPU that exists; anything else is one RunError line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise RunError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise RunError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise RunError(f"device {device!r} does not exist; this machine has cuda:0 to cuda:{count - 1}")
    return torch.device(device)


def check_memory(cfg: Config, n_params: int, device: torch.device) -> None:
    """Refuse an expert pool that cannot fit: its masks log α, their gradient and one sampled set of
    gates take 3 · n_experts · n_params floats, checked against the memory free on `device`."""
    if not cfg.has_masks:
        return
    needed = 3 * 4 * cfg.n_experts * n_params
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
            free = int(line.split()[1]) * 1024
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    if free is not None and needed > free:
        raise RunError(f"--experts {cfg.n_experts} needs about {needed / 2**30:.1f} GiB for the expert masks "
                       f"({cfg.n_experts} x {n_params} parameters), more than the {free / 2**30:.1f} GiB free on "
                       f"{device}; use fewer --experts")


@dataclass(frozen=True)
class Processes:
    """This process among `world` (torchrun sets WORLD_SIZE and RANK; one process otherwise)."""

    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 writes every file and prints; the others only compute."""
        return self.rank == 0


def processes(device: str, cfg: Config) -> Processes:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    procs = Processes(world, rank, pick_device(device))
    if world > 1 and cfg.meta_batch % world:
        raise RunError(f"meta_batch {cfg.meta_batch} must be a multiple of the {world} processes")
    return procs


def init_distributed(procs: Processes) -> Processes:
    """With several processes: the process group (NCCL on GPUs, gloo on CPUs), one GPU each."""
    if procs.world == 1 or dist.is_initialized():
        return procs
    dist.init_process_group("nccl" if procs.device.type == "cuda" else "gloo")
    if procs.device.type != "cuda":
        return procs
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return dataclasses.replace(procs, device=device)


def resolve_precision(precision: smat.Precision, device: torch.device) -> Literal["bf16", "fp16", "fp32"]:
    """What `--precision` means on this device, decided when a run (or a resumed run) starts.

    CPU: fp32 always (CPU bf16 matmuls are slower, not faster). CUDA: "auto" is bf16 where the card
    computes in bf16 natively (compute capability 8.0 and up: A100, H100, L4 ...), else fp16 with a
    GradScaler (V100, T4); an explicit bf16 on a card that would only emulate it is refused.
    config.json keeps "auto", so a run resumed on another card resolves it again; metrics.jsonl
    records what it resolved to.
    """
    if device.type != "cuda":
        return "fp32"
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and not native_bf16:
        raise RunError(f"precision bf16 asked for but {torch.cuda.get_device_name(device)} has no native bf16; "
                       f"use --precision auto or fp16")
    return precision


def autocast(precision: Literal["bf16", "fp16", "fp32"], device: torch.device):
    """Autocast to the resolved precision (fp32: none)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def default_workers() -> int:
    """Data worker processes per training process: the CPUs this process may use, shared among the
    training processes of this machine, less one for the process itself, at most 16.

    Measured (docs/benchmark.md): a worker spends about 0.45 s of CPU on a 128-px Meta-Dataset
    episode, so feeding a step of 60 ms takes about 8 busy workers, more for the largest episodes;
    on a 2-core machine the one worker this gives trained as fast as the old background thread and
    faster than making episodes in the training process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def compile_backbone(model: SMAT, backend: str = "inductor") -> None:
    """`--compile`: torch.compile the backbone's forward, which every f_θ(x) of the step runs through
    (smat.SMAT.features). The rest of the step (autograd.grad for the inner step and the teacher, the
    merge of the experts) stays eager. Episodes vary in size, so shapes are compiled as dynamic from the
    start: one graph with gradients and one without (the frozen pass, the teacher's last pass,
    evaluation). Shape checks must be off (`--compile` turns them off): dynamo cannot trace
    jaxtyping's checks. The step takes gradients through the backbone with retain_graph=True (the
    inner step, the teacher's first gradient), which compiled backwards that donate their buffers
    refuse, so buffer donation is switched off."""
    from torch._functorch import config as functorch_config

    functorch_config.donated_buffer = False
    model.architecture.compile(backend=backend, dynamic=True)
