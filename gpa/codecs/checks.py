"""Input checks shared by the speech codecs (BiCodec and GPA-nano's)."""

from __future__ import annotations

import numpy as np
import torch


def check_batch(wavs: list[np.ndarray]) -> None:
    """A non-empty list of non-empty (N,) waveforms, else ValueError naming the bad item."""
    if isinstance(wavs, np.ndarray) or not len(wavs):
        raise ValueError("expected a non-empty list of (N,) waveforms")
    for i, w in enumerate(wavs):
        if np.ndim(w) != 1 or len(w) == 0:
            raise ValueError(f"waveform {i} must be a non-empty (N,) array, got shape {np.shape(w)}")


def check_codes(semantic: torch.Tensor, global_codes: torch.Tensor, num_global_tokens: int,
                semantic_codebook_size: int, global_codebook_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (B, T) semantic and (B, num_global_tokens) global codes: integers in range; as int64 on ``device``."""
    semantic, global_codes = torch.as_tensor(semantic), torch.as_tensor(global_codes)
    if semantic.dim() != 2 or global_codes.shape != (semantic.shape[0], num_global_tokens):
        raise ValueError(f"expected semantic (B, T) and global (B, {num_global_tokens}) codes, "
                         f"got {tuple(semantic.shape)} and {tuple(global_codes.shape)}")
    for name, codes, size in (("semantic", semantic, semantic_codebook_size),
                              ("global", global_codes, global_codebook_size)):
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"{name} codes must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= size):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"{name} codes must be in [0, {size}), got values in [{lo}, {hi}]")
    return semantic.long().to(device), global_codes.long().to(device)
