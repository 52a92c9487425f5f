"""Training checkpoints: model, optimizer, data position and RNG state; safetensors + JSON, written atomically.

A run directory holds ``checkpoints/step-0000100/`` with::

    model.safetensors      every model tensor (LoRA adapters included)
    optimizer.safetensors  AdamW state, flattened to "<parameter name>.<state name>"
    rng-<rank>.safetensors each process's torch RNG state
    trainer.json           step, data position, configs, optimizer param groups

A checkpoint is built in ``.tmp-step-N`` and renamed into place: a directory named ``step-N`` is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import state_dict as dcp

from gpa.weights import read_safetensors

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d+)")
TRAINER = "trainer.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step in a run directory, or None."""
    root = checkpoints_dir(run_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))] \
        if root.is_dir() else []
    return max(found)[1] if found else None


FULL = dcp.StateDictOptions(full_state_dict=True)  # whole tensors under their plain names, also from FSDP shards
GATHER = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # ... gathered to the CPU of rank 0 only


def _flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}


def _flatten_optimizer(model: nn.Module, opt: torch.optim.Optimizer
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as "<parameter name>.<state name>" tensors, and the param groups (JSON-ready)."""
    sd = dcp.get_optimizer_state_dict(model, opt, options=GATHER)
    tensors = _flat({f"{name}.{k}": v for name, st in sd.get("state", {}).items() for k, v in st.items()})
    return tensors, sd.get("param_groups", [])


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    groups: list[dict[str, Any]]) -> None:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    dcp.set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=FULL)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}  # (5056,) uint8
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    meta: dict[str, Any], rank: int = 0, keep: int = 2) -> Path:
    """Write the step's checkpoint atomically (every rank calls this; rank 0 writes the shared files)."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a run killed while saving
        tmp.mkdir(parents=True)
    _barrier()
    save_file(_rng_state(), str(tmp / f"rng-{rank}.safetensors"))
    weights = _flat(dcp.get_model_state_dict(model, options=GATHER))  # collective under FSDP: every rank calls
    tensors, groups = _flatten_optimizer(model, opt)
    if rank == 0:
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / TRAINER).write_text(json.dumps({**meta, "step": step, "param_groups": groups}, indent=1))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER).read_text())


def load_checkpoint(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None, rank: int = 0
                    ) -> dict[str, Any]:
    """Restore model (strictly), optimizer and this rank's RNG; returns trainer.json.

    ``model`` is the plain or FSDP-sharded module (not a DDP wrapper); every rank reads the files.
    """
    path = Path(path)
    meta = read_meta(path)
    dcp.set_model_state_dict(model, read_safetensors(path / "model.safetensors"), options=FULL)  # strict
    if opt is not None:
        _load_optimizer(model, opt, read_safetensors(path / "optimizer.safetensors"), meta["param_groups"])
    rng_file = path / f"rng-{rank}.safetensors"
    if rng_file.is_file():
        rng = read_safetensors(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        logger.warning("%s has no RNG state for rank %d (different world size?); dropout will differ", path, rank)
    return meta
