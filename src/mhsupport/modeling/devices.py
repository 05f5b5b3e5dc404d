"""The one device rule for every model the pipeline loads, and its record for manifests.

`runtime.device`: `auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`. Under
torchrun (LOCAL_RANK set) `auto` and `cuda` give each process `cuda:LOCAL_RANK`. Inference runs in
bf16 where the device supports it (`runtime.bf16=auto`): a GPU that reports bf16, or a CPU with
bf16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo, where the SmolLM2 cpu profile
generates about 2x faster than in fp32); fp32 elsewhere. Training keeps fp32 weights and lets the
Trainer autocast to bf16 where the same rule says (training.training_arguments).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mhsupport.errors import MhsError

# The runtime keys of the rule: a stage that runs upstream stages (reproduce) passes them on.
RULE_KEYS = ("device", "bf16")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products: bf16 matmuls beat fp32
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def _setting(runtime, key: str, default):
    return runtime.get(key, default) if runtime is not None else default


def resolve(runtime) -> torch.device:
    """The device `runtime.device` names (a config node, or None for the defaults)."""
    requested = str(_setting(runtime, "device", "auto"))
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0"))
    elif re.fullmatch(r"cuda:\d+", requested):
        index = int(requested.split(":")[1])
    else:
        raise MhsError(f"runtime.device={requested!r}: expected auto, cpu, cuda or cuda:N")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= visible:
        raise MhsError(f"runtime.device={requested!r} needs CUDA device {index}, but {visible} "
                       f"{'is' if visible == 1 else 'are'} visible (torch {torch.__version__}): "
                       "use runtime.device=auto or runtime.device=cpu")
    return torch.device("cuda", index)


def bf16_setting(runtime):
    value = _setting(runtime, "bf16", "auto")
    if value not in ("auto", True, False):
        raise MhsError(f"runtime.bf16={value!r}: expected auto, true or false")
    return value


def uses_bf16(device: torch.device, runtime) -> bool:
    """bf16 by the rule: `auto` means on a GPU that supports it, or on a CPU with bf16 instructions."""
    value = bf16_setting(runtime)
    if value == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_supports_bf16()
    return value


def cpu_supports_bf16() -> bool:
    return any(flag in CPU_BF16_FLAGS for flag in cpu_description()["flags"])


def inference(runtime) -> Placement:
    device = resolve(runtime)
    return Placement(device, torch.bfloat16 if uses_bf16(device, runtime) else torch.float32)


def training(runtime) -> Placement:
    """fp32 weights on the rule's device; the Trainer adds bf16 autocast where the rule says."""
    return Placement(resolve(runtime), torch.float32)


def place(model, placement: Placement):
    return model.to(device=placement.device, dtype=placement.dtype)


def check_training_device(device: torch.device) -> None:
    """The Trainer puts a single process on cuda:0 and each torchrun process on cuda:LOCAL_RANK;
    another explicit GPU cannot be honoured there."""
    expected = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index != expected:
        raise MhsError(f"runtime.device=cuda:{device.index}: training runs on cuda:{expected} here (the Trainer's "
                       f"choice); pick the GPU with CUDA_VISIBLE_DEVICES={device.index} and runtime.device=auto")


def cpu_description() -> dict:
    """The CPU's model name and the vector/matrix extensions that decide its fp32/bf16 speed."""
    name, flags = None, set()
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"name": name, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": [flag for flag in CPU_FLAGS if flag in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def cuda_description(index: int) -> dict:
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "index": index, "visible_devices": torch.cuda.device_count(),
            "capability": f"{major}.{minor}", "bf16_supported": torch.cuda.is_bf16_supported(),
            "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda}


def model_placement(model) -> dict:
    parameter = next(model.parameters())
    return {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch.")}


def describe(runtime, loaded: dict, autocast: str | None = None) -> dict:
    """What a run's manifest records: the rule as configured, where each loaded model actually was
    (name -> model) and in what dtype, the GPU (if a model was on one) and the CPU."""
    placements = {name: model_placement(model) for name, model in loaded.items()}
    gpus = sorted({torch.device(p["device"]).index or 0 for p in placements.values() if p["device"].startswith("cuda")})
    return {"requested": str(_setting(runtime, "device", "auto")), "bf16": _setting(runtime, "bf16", "auto"),
            "models": placements, "autocast": autocast,
            "cuda": [cuda_description(index) for index in gpus] or None, "cpu": cpu_description()}
