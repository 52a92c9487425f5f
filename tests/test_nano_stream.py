"""Exact incremental GPA-nano decoding (gpa.codecs.nano_stream): every chunking of the codes gives the
offline decode's samples, at the delay the decoder's structure implies.

Runs on the tiny random-weight nano codec of the ``nano_dir`` fixture (conftest) and a variant of its
config with an odd number of mel frames per code.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpa.codecs.bicodec_stream import Chain, Conv, ConvTranspose, Parallel, Pointwise
from gpa.codecs.nano import NanoCodec, WindowedDecoder
from gpa.codecs.nano_stream import IncrementalDecoder
from gpa.engine.streaming import AudioStreamer, StreamConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def audible(codec: NanoCodec) -> NanoCodec:
    """The codec with its HiFi-GAN's conv weights doubled and biases cut to a tenth, in place (as the
    ``nano_dir`` fixture's codec is; used here for codecs made in the test).

    PyTorch's random init shrinks the signal through the vocoder's ~40 convolutions: the fixture's
    waveform is its biases' DC with a std of ~2e-5, so a 1e-5 tolerance would test nothing. Rescaled,
    the waveform's std is ~0.07, without clipping.
    """
    with torch.no_grad():
        for m in codec.vocoder.modules():
            if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
                m.weight.mul_(2.0)
                m.bias.mul_(0.1)
    return codec


def check_audible(wav: torch.Tensor) -> torch.Tensor:
    assert wav.std() > 0.01, f"the test waveform is near constant (std {wav.std():.2g}); the tolerances test nothing"
    return wav


@pytest.fixture(scope="module")
def codec(nano_dir: Path) -> NanoCodec:
    return NanoCodec.from_dir(nano_dir / "nano-codec")  # the fixture's vocoder is already rescaled (conftest)


def random_codes(codec: NanoCodec, n: int, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, codec.semantic_codebook_size, (batch, n), generator=g),
            torch.randint(0, codec.global_codebook_size, (batch, codec.num_global_tokens), generator=g))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def stream(dec: IncrementalDecoder | WindowedDecoder, semantic: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Push ``semantic`` (B, T) in pieces of ``sizes`` (cut at T); check each push's sample count and that
    preview() is what finish() returns; the concatenated output (B, N)."""
    out, pushed, hop = [], 0, dec.codec.hop_length
    for size in sizes:
        if pushed >= semantic.shape[1]:
            break
        piece = semantic[:, pushed : pushed + size]
        pushed += piece.shape[1]
        out.append(dec.push(piece))
        assert out[-1].dtype == torch.float32 and out[-1].shape[0] == semantic.shape[0]
        assert sum(o.shape[1] for o in out) == max(0, pushed - dec.lookahead) * hop, (pushed, sizes[:4])
    assert pushed == semantic.shape[1]
    preview = dec.preview()
    out.append(dec.finish())
    assert torch.equal(preview, out[-1])
    return torch.cat(out, dim=1)


def chunkings(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] * n, [n], [3] * n, [int(s) for s in rng.integers(1, 12, n)], [13, 1, 14] + [2] * n]


@pytest.mark.parametrize("n", [1, 2, 13, 14, 47])
def test_stream_equals_offline_decode_for_any_chunking(codec, n):
    semantic, glob = random_codes(codec, n, n)
    offline = codec.decode(semantic, glob)
    assert offline.shape == (1, n * codec.hop_length)
    check_audible(offline)
    for sizes in chunkings(n, n):
        y = stream(codec.incremental_decoder(glob[0]), semantic, sizes)
        assert y.shape == offline.shape  # never a duplicated or missing sample
        assert (y - offline).abs().max() <= 1e-5, sizes[:5]


def test_batch_rows_stream_like_single_streams(codec):
    semantic, glob = random_codes(codec, 30, 7, batch=2)
    y = stream(codec.incremental_decoder(glob), semantic, [4] * 8)
    for row in range(2):
        offline = codec.decode(semantic[row : row + 1], glob[row : row + 1])
        assert (y[row] - offline[0]).abs().max() <= 1e-5


def test_preview_is_the_decode_of_the_codes_so_far_and_leaves_the_stream_alone(codec):
    semantic, glob = random_codes(codec, 40, 11)
    dec = codec.incremental_decoder(glob)
    out = []
    for stop in (1, 5, 6, 20, 33, 40):
        out.append(dec.push(semantic[:, dec.frames : stop]))
        so_far = torch.cat([*out, dec.preview()], dim=1)
        offline = codec.decode(semantic[:, :stop], glob)  # as if the codes ended here
        assert so_far.shape == offline.shape and (so_far - offline).abs().max() <= 1e-5, stop
    out.append(dec.finish())
    assert (torch.cat(out, dim=1) - codec.decode(semantic, glob)).abs().max() <= 1e-5


def test_lookahead_is_the_decoders_structural_reach(nano_dir):
    """The ops' lag is exact: the first sample held back after k codes depends on code k (0-based), the one
    before it on no later code. Checked by float64 autograd through the offline modules."""
    codec = NanoCodec.from_dir(nano_dir / "nano-codec").set_decode_dtype(torch.float64)
    dec = codec.incremental_decoder(torch.zeros(codec.num_global_tokens, dtype=torch.long))
    hop, lag = codec.hop_length, dec.lag
    assert dec.lookahead == -(-lag // hop) == codec.context  # the autograd-measured reach, in whole codes
    k = dec.lookahead + 2
    semantic, glob = random_codes(codec, k + dec.lookahead + 2, 3)
    m = codec.decoder
    with torch.enable_grad():
        emb = m.embed(semantic).detach().requires_grad_(True)
        base = m.mel_table(semantic).detach().requires_grad_(True)
        wav = codec.vocoder(m.from_embedded(emb, base, codec.speaker.condition_from_codes(glob)))
        held = torch.autograd.grad(wav[0, k * hop - lag], emb, retain_graph=True)[0]
        final_emb, final_base = torch.autograd.grad(wav[0, k * hop - lag - 1], (emb, base))
    assert held[0, k].abs().sum() > 0 and held[0, k + 1 :].abs().sum() == 0
    assert final_emb[0, k:].abs().sum() == 0 and final_base[0, k:].abs().sum() == 0
    assert final_emb[0, k - 1].abs().sum() > 0


def test_decode_dtype_is_respected(nano_dir):
    codec = NanoCodec.from_dir(nano_dir / "nano-codec")
    semantic, glob = random_codes(codec, 25, 2)
    check_audible(codec.decode(semantic, glob))
    codec.set_decode_dtype(torch.float64)
    y = stream(codec.incremental_decoder(glob), semantic, [1] * 5 + [7] * 3)
    assert (y - codec.decode(semantic, glob)).abs().max() <= 1e-12  # float64 sums agree to well within float32
    fp32 = codec.set_decode_dtype(torch.float32).decode(semantic, glob)
    codec.set_decode_dtype(torch.bfloat16)
    y = stream(codec.incremental_decoder(glob), semantic, [4] * 7)
    offline = codec.decode(semantic, glob)
    # computed in bfloat16: off float32 by its rounding (~1.5 % here), as much as the offline bf16 decode is
    assert y.shape == offline.shape and 1e-3 < rel_err(y, fp32) <= 2 * rel_err(offline, fp32)
    dec = codec.incremental_decoder(glob)
    dec.push(semantic[:, :3])
    codec.set_decode_dtype(torch.float32)
    with pytest.raises(RuntimeError, match="decode dtype changed from torch.bfloat16 to torch.float32"):
        dec.push(semantic[:, 3:5])


def test_odd_mel_per_token_crops_the_upsampler_end_like_offline(nano_config):
    torch.manual_seed(1)
    codec = audible(NanoCodec(replace(nano_config, mel_per_token=3)).eval().requires_grad_(False))
    assert codec.decoder.up(torch.zeros(1, nano_config.decoder_dim, 5)).shape[-1] == 5 * 3 + 1  # one frame cut
    semantic, glob = random_codes(codec, 20, 4)
    offline = check_audible(codec.decode(semantic, glob))
    for sizes in ([1] * 20, [6, 1, 13], [20]):
        y = stream(codec.incremental_decoder(glob), semantic, sizes)
        assert y.shape == offline.shape and (y - offline).abs().max() <= 1e-5, sizes


def test_windowed_reference_decoder_agrees(codec):
    semantic, glob = random_codes(codec, 35, 9)
    offline = codec.decode(semantic, glob)
    windowed = WindowedDecoder(codec, glob[0])
    assert windowed.lookahead == codec.incremental_decoder(glob).lookahead
    y = stream(windowed, semantic, [5, 1, 10, 10, 10])
    assert y.shape == offline.shape and (y - offline).abs().max() <= 1e-5


def test_engine_streamer_with_default_config_equals_offline(codec):
    semantic, glob = random_codes(codec, 60, 5)
    streamer = AudioStreamer(codec, glob[0], StreamConfig())
    assert isinstance(streamer.decoder, IncrementalDecoder) and streamer.exact
    chunks = [c for code in semantic[0].tolist() for c in streamer.push([code])] + streamer.finish()
    hop = codec.hop_length
    assert [len(c) // hop for c in chunks] == [5, 10, 10, 10, 10, 15]  # the rest on finish
    offline = codec.decode(semantic, glob)[0].numpy()
    assert np.abs(np.concatenate(chunks) - offline).max() <= 1e-5


def test_bad_use_is_an_error(codec):
    semantic, glob = random_codes(codec, 4, 1)
    with pytest.raises(ValueError, match="expected global codes"):
        codec.incremental_decoder(glob[None])
    with pytest.raises(ValueError, match="global codes must be in"):
        codec.incremental_decoder(glob + codec.global_codebook_size)
    dec = codec.incremental_decoder(glob)
    with pytest.raises(ValueError, match="semantic codes must be in"):
        dec.push(semantic - 1 - semantic.max())
    with pytest.raises(ValueError, match="semantic codes must be integers"):
        dec.push(semantic.float())
    assert dec.push(semantic[:, :0]).shape == (1, 0)
    dec.push(semantic)
    dec.finish()
    with pytest.raises(RuntimeError, match="push\\(\\) after finish"):
        dec.push(semantic)
    with pytest.raises(RuntimeError, match="finish\\(\\) called twice"):
        dec.finish()


def test_parallel_op_aligns_branches_of_different_lag():
    torch.manual_seed(0)
    a, b = nn.Conv1d(3, 2, 3, padding=1), nn.Conv1d(3, 2, 5, padding=4, dilation=2)
    up = nn.ConvTranspose1d(3, 2, 4, 2, padding=1)
    x = torch.randn(1, 3, 23)
    with torch.no_grad():
        expected = (a(x) + b(x) + torch.tanh(a(x))) / 3
        for sizes in ([1] * 23, [23], [5, 2, 16]):
            op = Parallel([Conv(a), Conv(b), Chain([Conv(a), Pointwise(torch.tanh)])], mean=True)
            assert (op.rate, op.lag) == (1, 4)
            outs, pushed = [], 0
            for s in sizes:
                y = op.step(x[..., pushed : pushed + s])
                pushed += s
                if y is not None:
                    outs.append(y)
                assert sum(o.shape[-1] for o in outs) == max(0, pushed - op.lag)
            outs.append(op.flush())
            assert torch.allclose(torch.cat(outs, dim=-1), expected, atol=1e-6)
    with pytest.raises(ValueError, match="share one rate, got rates \\[1, 2\\]"):
        Parallel([Conv(a), ConvTranspose(up)])
