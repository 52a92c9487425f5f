"""Weight-only int8 for the LLM's linear layers: CPU decoding reads half the bytes of bf16.

Each output row keeps its own scale (symmetric, per channel); the product runs in torch's
int8-weight kernel on bf16 inputs and returns in the activations' dtype (the model's).
Decoding one token reads every weight once, so on a CPU its time follows the weight bytes: fp32 4,
bf16 2, int8 1 byte per parameter.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8")
INT8_KERNEL_MAX_ROWS = 8  # measured here: beyond about 8 rows the int8-weight kernel loses to bf16


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights (out, in) and bf16 per-row scales."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @classmethod
    def fuse(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One layer computing the concatenated outputs of ``parts`` (exactly: scales are per row).

        The parts' weights and scales become views of the fused layer's, so no memory is added.
        """
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("weight", torch.cat([p.weight for p in parts]))
        fused.register_buffer("scale", torch.cat([p.scale for p in parts]))
        fused.in_features, fused.out_features = parts[0].in_features, fused.weight.shape[0]
        start = 0
        for p in parts:
            end = start + p.out_features
            p.weight, p.scale = fused.weight[start:end], fused.scale[start:end]
            start = end
        return fused

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        if flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)  # (N, out)
        else:  # many rows (prefill): the bf16 kernel on dequantized weights is faster
            y = F.linear(flat, self.weight.to(torch.bfloat16) * self.scale[:, None])
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def quantize_int8(model: nn.Module, names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj")) -> int:
    """Replace bias-free ``nn.Linear`` children called ``names`` by :class:`Int8Linear` in place.

    Returns:
        the number of layers replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, Int8Linear(child.weight).to(child.weight.device))
                replaced += 1
    logger.info("int8 weight-only quantization: %d linear layers", replaced)
    return replaced


def head_module(weight: Tensor, quant: str) -> nn.Module:
    """A (rows, C) output head as a module: the rows as they are, or int8."""
    if quant == "int8":
        return Int8Linear(weight)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head
