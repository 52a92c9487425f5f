"""LoRA: low-rank adapters on the LM's linear layers, under the base weights' own names."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_A, LORA_B = "lora_A", "lora_B"


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scale * dropout(x) A^T B^T`` with W, b frozen; B starts at zero (no change at step 0).

    It keeps the wrapped layer's ``weight`` and ``bias`` parameters, so state dicts keep the HF names
    and only ``lora_A``/``lora_B`` are added.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse the base weight instead of allocating one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]) -> int:
    """Freeze ``model`` and wrap every linear child named in ``targets``; returns how many were wrapped."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layers named {targets} to adapt")
    return wrapped


def is_lora_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in (LORA_A, LORA_B)


def merge_lora(state: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A plain state dict: each adapted ``W`` becomes ``W + scale * B A`` and the adapters are dropped."""
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        m = re.fullmatch(rf"(.*)\.{LORA_A}", key)
        if m:
            prefix = m.group(1)
            a, b = state[key].float(), state[f"{prefix}.{LORA_B}"].float()
            w = out[f"{prefix}.weight"]
            out[f"{prefix}.weight"] = (w.float() + scale * b @ a).to(w.dtype)
    return out
