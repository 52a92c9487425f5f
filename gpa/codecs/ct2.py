"""Read CTranslate2 ``model.bin`` files (binary format version 6) into torch tensors, without ctranslate2.

Layout (all integers little-endian; a *string* is a uint16 byte count n, then n bytes: UTF-8 text
and a terminating NUL):

    uint32  binary version (we read 6; versions 5 and below are rejected)
    string  spec name (e.g. "WhisperSpec")
    uint32  spec revision
    uint32  number of variables, then for each variable:
        string          name, scopes joined by "/" (e.g. "encoder/layer_0/ffn/linear_0/weight")
        uint8           rank r, then r x uint32 dimensions
        uint8           dtype id: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
        uint32          payload byte count, then the raw row-major payload
    uint32  number of aliases, then for each: string alias, string target variable name

Int8-quantized linear weights come with a ``<scope>/weight_scale`` float32 vector (one scale per
output row: real = int8 / scale); :func:`dequantize` applies it. Scalars (rank 0) carry
configuration values such as ``encoder/num_heads``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from gpa.weights import CheckpointError

SUPPORTED_VERSION = 6
_DTYPES: dict[int, tuple[np.dtype, torch.dtype | None]] = {
    0: (np.dtype("<f4"), None),
    1: (np.dtype("i1"), None),
    2: (np.dtype("<i2"), None),
    3: (np.dtype("<i4"), None),
    4: (np.dtype("<f2"), None),
    5: (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: read the bits, view as bf16
}


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.source}: truncated CTranslate2 file (need {n} bytes at offset "
                                  f"{self.pos}, file has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw.endswith(b"\0"):
            raise CheckpointError(f"{self.source}: string at offset {self.pos - len(raw)} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def read_ct2(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """Read every variable of a CTranslate2 ``model.bin``.

    Args:
        path: the ``model.bin`` file.

    Returns:
        (spec name, {variable name: tensor in its stored dtype}, {alias: variable name}).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing CTranslate2 model file: {path}")
    r = _Reader(path.read_bytes(), str(path))
    version = r.unpack("I")
    if version != SUPPORTED_VERSION:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version}; only {SUPPORTED_VERSION} is supported")
    spec = r.string()
    r.unpack("I")  # spec revision: the variable names below already say everything we use
    variables: dict[str, torch.Tensor] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        type_id = r.unpack("B")
        if type_id not in _DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has unknown dtype id {type_id}; "
                                  f"known: {sorted(_DTYPES)}")
        np_dtype, view = _DTYPES[type_id]
        payload = r.take(r.unpack("I"))
        if len(payload) != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
            raise CheckpointError(f"{path}: variable {name!r} has {len(payload)} bytes for shape {shape} "
                                  f"of {np_dtype}")
        t = torch.from_numpy(np.frombuffer(payload, dtype=np_dtype).reshape(shape).copy())
        variables[name] = t.view(view) if view is not None else t
    aliases = {r.string(): r.string() for _ in range(r.unpack("I"))}
    if r.pos != len(r.data):
        raise CheckpointError(f"{path}: {len(r.data) - r.pos} trailing bytes after the aliases")
    return spec, variables, aliases


def dequantize(variables: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The float32 value of ``name``, applying ``<scope>/weight_scale`` when the weight is int8/int16."""
    t = variables[name]
    if t.is_floating_point():
        return t.float()
    scale_name = name.rsplit("/", 1)[0] + "/weight_scale"
    if scale_name not in variables:
        raise CheckpointError(f"integer variable {name!r} has no {scale_name!r} to dequantize it")
    scale = variables[scale_name].float()  # (out,) per output row
    return t.float() / scale.view(-1, *([1] * (t.ndim - 1)))
