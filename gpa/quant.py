"""Weight-only int8 and int4 for the LLM's linear layers: CPU decoding reads a half or a quarter of bf16's bytes.

int8: each output row keeps its own scale (symmetric, per channel); the product runs in torch's
int8-weight kernel on bf16 inputs and returns in the activations' dtype (the model's).
int4: each group of :data:`INT4_GROUP` inputs of a row keeps a scale and an offset (asymmetric,
min-max), for torch's CPU int4-weight kernel. Decoding one token reads every weight once, so on a CPU
its time follows the weight bytes: fp32 4, bf16 2, int8 1, int4 0.5 byte per parameter. Measured
here (2 cores, the 0.3B model's 28 layers streamed from memory, one row): int8 17.3 ms, int4 8.1 ms,
bf16 41 ms; the price is accuracy (a random Gaussian matrix's product: 0.8 % error in int8, 8.9 % in
int4), which the tests and ``gpa eval`` measure.

Int8 products for prefills (``int8_gemm=True``): long prefills are bound by arithmetic, not by weight bytes,
and an int8 GEMM (VNNI) runs at about twice bf16's rate here (~750-830 against ~340-430 GOP/s at 500-630
rows). Each layer then also keeps int8 weights (in, out) with a float32 scale per output (from the float
weights: int4 layers keep a second, finer copy), and inside :func:`int8_products` its products quantize
every input row to int8 (scale = max |x| / 127) and run in gpa.native's ``int8_linear``: exact int32 sums,
so a row's result never depends on the other rows of the call. ``bench/accuracy.py`` gives the cost.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa import native

logger = logging.getLogger(__name__)

INT8_KERNEL_MAX_ROWS = 24  # measured here (0.3B, whole forward): the int8 kernel wins up to ~24-32 rows (16: 90
# vs 138 ms), the bf16 kernel on dequantized weights beyond (64: 189 vs 268 ms); decode at c=9..24 takes the kernel
INT4_KERNEL_MAX_ROWS = 256  # measured here (0.3B, all 28 layers): unpacking every weight to bf16 costs ~0.4-0.5 s,
# the int4 kernel 2.7 ms per row; at 256 rows they tie (714 vs 741 ms), at ASR's ~630-row prefill the bf16 GEMM wins
INT4_NATIVE_MAX_ROWS = 64  # the same with gpa.native's unpacking (84 ms for all 28 layers): they tie at 64 rows
INT4_NATIVE_GEMM_MAX_ROWS = 512  # gpa.native's int4_matmul against unpacking + the bf16 GEMM, 28 layers (measured
# with its earlier bf16 products; the integer ones are ~2x faster): 8 rows 14 vs 23 ms for torch's int4 kernel; 256
# rows 325 vs 400 ms; 512: 640 vs 658; 640: 800 vs 800
INT4_GROUP = 64  # inputs per scale/offset: 32 was 1.7x slower here, 128 and 256 less accurate (9.9 %, 10.9 %)
INT4_ROW_BLOCK = 64  # the kernel packs rows in blocks of 64: a layer's (and a fused part's) rows are a multiple
_INT8_PRODUCTS = contextvars.ContextVar("gpa_int8_products", default=False)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def int8_products(enabled: bool = True) -> Iterator[None]:
    """Within this block (on this thread), layers that keep int8 GEMM weights (``int8_gemm``) multiply in int8
    when gpa.native is loaded; the LLM's forward opens it for prefills (:attr:`gpa.model.GPALM.int8_prefill`)."""
    token = _INT8_PRODUCTS.set(enabled)
    try:
        yield
    finally:
        _INT8_PRODUCTS.reset(token)


def gemm_weights(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weights as int8 GEMM operands: codes (in, out) int8 and scales (out,) float32 with
    ``weight ~ codes.T * scales[:, None]`` (symmetric, per output; the rule of :class:`Int8Linear`)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.t().contiguous(), scale


def _int8_product(ops: ModuleType, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> Tensor:
    """x (..., in) through gpa.native's ``int8_linear`` with GEMM operands ``codes`` (in, out) and ``scale`` (out,):
    (..., out) in ``out_dtype``, else in x's dtype (float32 for other float dtypes)."""
    flat = x.reshape(-1, codes.shape[0])
    if flat.dtype not in (torch.float32, torch.bfloat16):
        flat = flat.float()
    return ops.int8_linear(flat, codes, scale, bias, out_dtype).view(*x.shape[:-1], codes.shape[1])


class _PackedLinear(nn.Module):
    """What the quantized linears share: bf16 inputs to a packed-weight kernel, outputs in the input's dtype,
    fusing that makes the parts' row-indexed tensors views of the fused layer's, and optional int8 GEMM weights
    (``gemm_codes`` (in, out) int8, ``gemm_scale`` (out,) float32) for :func:`int8_products`."""

    in_features: int
    out_features: int
    gemm_codes: Tensor | None
    gemm_scale: Tensor | None

    def _product(self, flat: Tensor) -> Tensor:
        """(N, in) bf16 -> (N, out)."""
        raise NotImplementedError

    def _keep_gemm(self, operands: tuple[Tensor, Tensor] | None) -> None:
        """Keep int8 GEMM operands (not in the state dict: they are derived from the weights)."""
        codes, scale = operands if operands is not None else (None, None)
        self.register_buffer("gemm_codes", codes, persistent=False)
        self.register_buffer("gemm_scale", scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if self.gemm_codes is not None and _INT8_PRODUCTS.get():
            ops = native.loaded()
            if ops is not None and flat.device.type == "cpu":
                y = _int8_product(ops, x, self.gemm_codes, self.gemm_scale)
                return y if y.dtype == x.dtype else y.to(x.dtype)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        y = self._product(flat).view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @classmethod
    def _fused(cls, parts: list, tensors: dict[str, Tensor], shared: tuple[str, ...]) -> Self:
        """A layer of ``cls`` holding ``tensors`` (the parts' concatenated); each part's ``shared`` tensors
        become views of the fused one's rows."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, t in tensors.items():
            fused.register_buffer(name, t)
        fused.in_features, fused.out_features = parts[0].in_features, fused.weight.shape[0]
        gemm = all(p.gemm_codes is not None for p in parts)
        fused._keep_gemm((torch.cat([p.gemm_codes for p in parts], dim=1), torch.cat([p.gemm_scale for p in parts]))
                         if gemm else None)
        start = 0
        for p in parts:
            end = start + p.out_features
            for name in shared:
                setattr(p, name, getattr(fused, name)[start:end])
            if gemm:  # the parts' GEMM operands become views of the fused ones (their columns)
                p.gemm_codes, p.gemm_scale = fused.gemm_codes[:, start:end], fused.gemm_scale[start:end]
            start = end
        return fused


class Int8Linear(_PackedLinear):
    """A bias-free Linear with int8 weights (out, in) and bf16 per-row scales (with ``int8_gemm``, the same codes
    also transposed for the int8 GEMM, scaled by those bf16 scales)."""

    def __init__(self, weight: Tensor, int8_gemm: bool = False) -> None:
        super().__init__()
        codes, scale = gemm_weights(weight)
        self.register_buffer("weight", codes.t().contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._keep_gemm((codes, self.scale.float()) if int8_gemm else None)

    @classmethod
    def fuse(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One layer computing the concatenated outputs of ``parts`` (exactly: scales are per row).

        The parts' weights and scales become views of the fused layer's, so no memory is added.
        """
        tensors = {"weight": torch.cat([p.weight for p in parts]), "scale": torch.cat([p.scale for p in parts])}
        return cls._fused(parts, tensors, ("weight", "scale"))

    def native_spec(self) -> tuple[int, Tensor, Tensor, int]:
        """This layer for gpa.native's decode_trunk: kind 1 (int8), weight, scales, the kernel's row limit."""
        return 1, self.weight, self.scale, INT8_KERNEL_MAX_ROWS

    def _product(self, flat: Tensor) -> Tensor:
        if flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)  # (N, out)
        # many rows (prefill): the bf16 kernel on dequantized weights is faster
        return F.linear(flat, self.weight.to(torch.bfloat16) * self.scale[:, None])


class Int4Linear(_PackedLinear):
    """A bias-free Linear with int4 weights in torch's CPU packing, a scale and offset per group of inputs.

    ``weight``: (out, in / 2) uint8, two 4-bit values per byte in the kernel's row-block layout;
    ``scale_zero``: (in / INT4_GROUP, out, 2) bfloat16, so that a weight is ``(q - 8) * scale + zero``
    with q in 0..15. The product runs on bf16 inputs (the kernel's float32 path was ~8x slower here)
    and returns in the activations' dtype: up to INT4_NATIVE_GEMM_MAX_ROWS rows through gpa.native's
    ``int4_matmul`` once the kernels are loaded (AVX512-VNNI: each row rounded to int8 per group of 64 inputs,
    exact integer products, the same packing), else torch's int4 kernel, or the bf16 GEMM on unpacked
    weights for long prefills. CPU only.
    """

    def __init__(self, weight: Tensor, int8_gemm: bool = False) -> None:
        super().__init__()
        if not self.supports(weight):
            raise ValueError(f"int4 needs out features divisible by {INT4_ROW_BLOCK} and in features by "
                             f"{INT4_GROUP}; got {tuple(weight.shape)}")
        w = weight.detach().float().cpu()
        n, k = w.shape
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16))
        self.in_features, self.out_features = k, n
        self._keep_gemm(gemm_weights(w) if int8_gemm else None)  # from the float weights: finer than int4's

    @staticmethod
    def supports(weight: Tensor) -> bool:
        """Whether a (out, in) weight fits the kernel's blocks."""
        return weight.shape[0] % INT4_ROW_BLOCK == 0 and weight.shape[1] % INT4_GROUP == 0

    @classmethod
    def fuse(cls, parts: list[Int4Linear]) -> Int4Linear:
        """One layer computing the concatenated outputs of ``parts`` (exact: rows are packed in whole blocks).

        The parts' weights become views of the fused layer's, so no memory is added (each keeps its own
        small scale/offset table: the kernel needs it contiguous, which a slice across rows is not).
        """
        tensors = {"weight": torch.cat([p.weight for p in parts]),
                   "scale_zero": torch.cat([p.scale_zero for p in parts], dim=1)}
        return cls._fused(parts, tensors, ("weight",))

    def dequantized(self) -> Tensor:
        """The (out, in) weights as bfloat16: ``(q - 8) * scale + zero`` per group, unpacked from the kernel's layout
        (per block of 64 rows, input k's 32 bytes hold rows j (low nibble) and j + 32 (high), j < 32)."""
        ops = native.loaded()  # one pass in C++ when gpa's kernels are loaded (0.3B: 84 ms against ~0.4 s of torch ops)
        if ops is not None and self.weight.device.type == "cpu":
            return ops.int4_dequantize(self.weight, self.scale_zero, INT4_GROUP)
        return self.unpacked()

    def unpacked(self) -> Tensor:
        """:meth:`dequantized` with torch ops (bf16 arithmetic)."""
        n, k = self.out_features, self.in_features
        packed = self.weight.view(n // INT4_ROW_BLOCK, k, INT4_ROW_BLOCK // 2)
        q = torch.cat([packed & 0xF, packed >> 4], dim=2).transpose(1, 2).reshape(n, k // INT4_GROUP, INT4_GROUP)
        scale, zero = self.scale_zero.permute(2, 1, 0).contiguous()  # each (out, in / INT4_GROUP)
        return torch.addcmul(zero[..., None], q.to(torch.bfloat16) - 8, scale[..., None]).reshape(n, k)

    def native_spec(self) -> tuple[int, Tensor, Tensor, int]:
        """This layer for gpa.native's decode_trunk: kind 2 (int4), packed weight, scales/offsets, group size."""
        return 2, self.weight, self.scale_zero, INT4_GROUP

    def _product(self, flat: Tensor) -> Tensor:
        ops = native.loaded()
        if ops is not None and hasattr(ops, "int4_matmul") and flat.shape[0] <= INT4_NATIVE_GEMM_MAX_ROWS:
            return ops.int4_matmul(flat, self.weight, self.scale_zero)
        limit = INT4_KERNEL_MAX_ROWS if ops is None else INT4_NATIVE_MAX_ROWS
        if flat.shape[0] > limit:  # prefill: the bf16 GEMM on weights unpacked now is faster
            return F.linear(flat, self.dequantized())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP, self.scale_zero)


def quantize_weights(model: nn.Module, mode: str, names: tuple[str, ...] = LINEAR_NAMES, int8_gemm: bool = False
                     ) -> int:
    """Replace bias-free ``nn.Linear`` children called ``names`` by int8 or int4 layers in place.

    With ``mode`` "int4", a layer whose shape does not fit the int4 kernel's blocks (and the other
    projections fused with it, so that fused parts share a type) is stored as int8 instead. With ``int8_gemm``
    every layer also keeps int8 GEMM operands for :func:`int8_products`.

    Returns:
        the number of layers replaced.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r}; expected int8 or int4")
    replaced, fallback = 0, 0
    for parent in list(model.modules()):
        children = {name: child for name, child in parent.named_children()
                    if name in names and isinstance(child, nn.Linear) and child.bias is None}
        int4 = mode == "int4" and all(Int4Linear.supports(c.weight) for c in children.values())
        for name, child in children.items():
            if child.weight.device.type != "cpu" and mode == "int4":
                raise ValueError("int4 weights run on CPU only; use int8 or none on other devices")
            layer = (Int4Linear(child.weight, int8_gemm) if int4
                     else Int8Linear(child.weight, int8_gemm).to(child.weight.device))
            setattr(parent, name, layer)
            replaced += 1
            fallback += mode == "int4" and not int4
    logger.info("%s weight-only quantization: %d linear layers%s", mode, replaced,
                f" ({fallback} as int8: shapes outside the int4 kernel's blocks)" if fallback else "")
    return replaced


class Int8GemmLinear(nn.Module):
    """An ``nn.Linear`` (bias or not) that always multiplies in int8: inputs quantized per row, int8 weights with a
    float32 scale per output (:func:`gemm_weights`), exact int32 sums, bias added in float32; gpa.native's
    ``int8_linear``, so only where the kernels are loaded. For encoders whose every call has many rows (the
    audio tokenizers' ``int8`` precision). Outputs in the input's dtype (float32 or bfloat16), or under CPU
    autocast in its dtype, as ``nn.Linear`` would (so what follows, e.g. the bf16 flash attention, runs as it
    would there)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        codes, scale = gemm_weights(linear.weight)
        self.register_buffer("codes", codes)  # (in, out) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().contiguous())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        ops = native.loaded()
        if ops is None:
            raise RuntimeError("Int8GemmLinear needs gpa.native's kernels (see gpa.native.unavailable_reason)")
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return _int8_product(ops, x, self.codes, self.scale, self.bias,
                             autocast if autocast == torch.bfloat16 else None)


def int8_gemm_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Int8GemmLinear` in place; returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8GemmLinear(child))
                replaced += 1
    return replaced


def head_module(weight: Tensor, quant: str) -> nn.Module:
    """A (rows, C) output head as a module: the rows as they are, or int8."""
    if quant in ("int8", "int4"):  # the head stays int8 in int4 mode: its rows (a task's ids) rarely fit blocks
        return Int8Linear(weight)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head
