"""Strict safetensors loading: every parameter accounted for, shapes checked, never unpickled."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not match the model it is loaded into."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by the plain ``weight`` they parametrise.

    Accepts the old ``X.weight_g`` / ``X.weight_v`` form and the newer
    ``X.parametrizations.weight.original0`` / ``original1`` form (g, v), both normalised over
    every dimension but 0 (torch's default ``dim=0``).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in ((".weight_g", ".weight_v"), (".parametrizations.weight.original0",
                                                                  ".parametrizations.weight.original1")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for prefix, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise CheckpointError(f"weight-norm parameter {prefix} has only {sorted(gv)} of (g, v)")
        g, v = gv["g"].float(), gv["v"].float()
        dims = tuple(range(1, v.dim()))
        out[prefix + ".weight"] = v * (g / v.norm(p=2, dim=dims, keepdim=True))
    return out


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def build_for_loading(factory: Callable[[], ModuleT]) -> ModuleT:
    """``factory()`` built without random initialisation, for a module whose parameters and persistent buffers
    :func:`load_strict` fills next (BiCodec and wav2vec2 at the official size: ~1.7 s of random init skipped).

    The module is built under ``torch.device("meta")``; its meta tensors then get uninitialised CPU storage.
    Tensors the constructor makes with an explicit device (filterbanks, windows: non-persistent buffers) are
    kept; a non-persistent buffer left on meta would never be loaded, so it is an error.
    """
    with torch.device("meta"):
        module = factory()
    persistent = set(module.state_dict())
    for prefix, mod in module.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                full = f"{prefix}.{name}" if prefix else name
                if full not in persistent:
                    raise RuntimeError(f"{full}: a non-persistent buffer built on the meta device would never be "
                                       "loaded; construct it with an explicit device")
                mod._buffers[name] = torch.empty_like(b, device="cpu")
    return module


def load_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module`` requiring the same names and shapes.

    Args:
        module: the model; its parameters and persistent buffers must all be present in ``state``.
        state: name -> tensor.
        source: the file or directory the state came from, named in the error.
        ignore_unexpected: key prefixes in ``state`` that the module deliberately does not use
            (e.g. a training-only postnet); anything else unexpected is an error.
    """
    own = module.state_dict()
    ignored = tuple(ignore_unexpected)
    missing = set(own) - set(state)
    unexpected = {k for k in set(state) - set(own) if not k.startswith(ignored)} if ignored else set(state) - set(own)
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:_MAX_LISTED])}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + " | ".join(problems))
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    logger.debug("loaded %d tensors from %s into %s", len(own), source, type(module).__name__)


INT8_SCALE = ".int8_scale"  # suffix of the per-row scale stored beside an int8 matrix


def pack_int8(state: Mapping[str, torch.Tensor], min_numel: int = 16384,
              skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Store large float matrices as int8 with one float32 scale per row (dim 0), for smaller files.

    A tensor with at least 2 dims and ``min_numel`` elements, whose name starts with no prefix in
    ``skip``, becomes ``name`` (int8, same shape) plus ``name + INT8_SCALE`` (float32, shape (rows, 1, ...)).
    Rounding error: at most half a step, i.e. max|row| / 254 per element.
    """
    skip = tuple(skip)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dim() >= 2 and t.numel() >= min_numel and not name.startswith(skip):
            x = t.float()
            scale = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-12) / 127
            out[name] = torch.round(x / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[name + INT8_SCALE] = scale.contiguous()
        else:
            out[name] = t
    return out


def unpack_int8(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Undo :func:`pack_int8`: int8 tensors with a scale become float32; a lone scale or int8 is an error."""
    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE)}
    for key in (k for k in state if k.endswith(INT8_SCALE)):
        name = key[: -len(INT8_SCALE)]
        if name not in state or state[name].dtype != torch.int8:
            raise CheckpointError(f"{source}: {key} has no int8 tensor {name} beside it")
        out[name] = state[name].float() * state[key].float()
    lone = [k for k, v in out.items() if v.dtype == torch.int8]
    if lone:
        raise CheckpointError(f"{source}: int8 tensors without a scale: {_listing(lone)}")
    return out
