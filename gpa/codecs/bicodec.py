"""BiCodec, Spark-TTS's speech codec: 50 Hz semantic codes plus 32 global (speaker) codes per utterance.

Tokenise:
- semantic: wav2vec2-XLSR hidden states 11/14/16 averaged -> ConvNeXt encoder -> factorised VQ
  (cosine nearest neighbour in an 8-dim codebook);
- global: the first 6 s (tiled if shorter) -> linear slaney mel -> ECAPA-TDNN -> Perceiver -> FSQ.

Detokenise: codebook lookup -> ConvNeXt prenet conditioned on the speaker vector (AdaLayerNorm) ->
DAC-style wave generator, exactly ``hop_length`` samples per semantic code.

Checkpoint: ``<dir>/config.yaml``, ``<dir>/model.safetensors`` and ``<dir>/wav2vec2-large-xlsr-53/``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from gpa.codecs.bicodec_layers import Encoder, FactorizedVQ, Prenet, WaveGenerator
from gpa.codecs.bicodec_speaker import SpeakerEncoder
from gpa.codecs.bicodec_stream import IncrementalDecoder
from gpa.codecs.checks import check_batch, check_codes
from gpa.codecs.mel import slaney_filterbank
from gpa.codecs.wav2vec2 import Wav2Vec2, normalize_input
from gpa.weights import CheckpointError, build_for_loading, fold_weight_norm, load_strict, read_safetensors

logger = logging.getLogger(__name__)

WAV2VEC2_DIR = "wav2vec2-large-xlsr-53"
FEATURE_LAYERS = (11, 14, 16)  # wav2vec2 hidden states averaged into the content features

# Checkpoint entries with no part in inference: the training-only postnet, the mel front end's
# buffers (recomputed here), the VQ usage statistics and the ECAPA x-vector head.
_UNUSED_PREFIXES = (
    "postnet.",
    "mel_transformer.",
    "quantizer.cluster_size",
    "speaker_encoder.speaker_encoder.pool.",
    "speaker_encoder.speaker_encoder.bn.",
    "speaker_encoder.speaker_encoder.linear.",
)


@dataclass(frozen=True)
class MelConfig:
    """The speaker branch's mel spectrogram (torchaudio MelSpectrogram, power 1, slaney)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 640
    hop_length: int = 320
    mel_fmin: float = 10.0
    mel_fmax: float | None = None  # None: sample_rate / 2
    num_mels: int = 128


@dataclass(frozen=True)
class EncoderConfig:
    """Content encoder: VocosBackbone, resampling stages, linear projection."""

    input_channels: int = 1024  # wav2vec2 hidden size
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    out_channels: int = 1024
    sample_ratios: tuple[int, ...] = (1, 1)


@dataclass(frozen=True)
class QuantizerConfig:
    """Factorised VQ of the semantic stream."""

    input_dim: int = 1024
    codebook_size: int = 8192
    codebook_dim: int = 8


@dataclass(frozen=True)
class SpeakerConfig:
    """Speaker encoder and its FSQ."""

    input_dim: int = 128  # mel bins
    out_dim: int = 1024  # speaker condition vector
    latent_dim: int = 128
    token_num: int = 32  # global codes per utterance
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    fsq_num_quantizers: int = 1


@dataclass(frozen=True)
class PrenetConfig:
    """Decoder-side ConvNeXt stack conditioned on the speaker vector."""

    input_channels: int = 1024
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    out_channels: int = 1024
    condition_dim: int = 1024
    sample_ratios: tuple[int, ...] = (1, 1)
    use_tanh_at_final: bool = False


@dataclass(frozen=True)
class DecoderConfig:
    """Wave generator: upsampling rates multiply to the hop length."""

    input_channel: int = 1024
    channels: int = 1536
    rates: tuple[int, ...] = (8, 5, 4, 2)
    kernel_sizes: tuple[int, ...] = (16, 11, 8, 4)


# Keys the reference accepts in a section and that do not affect inference.
_TRAINING_KEYS = {
    "quantizer": {"commitment", "codebook_loss_weight", "use_l2_normlize", "threshold_ema_dead_code",
                  "decay", "momentum"},
}
# Sections whose other unknown keys the reference ignores (it reads mel_params by name and the VQ
# takes **kwargs); elsewhere its constructors would reject them, and so do we.
_LENIENT_SECTIONS = ("mel_params", "quantizer")
_SECTIONS = {
    "mel_params": MelConfig, "encoder": EncoderConfig, "quantizer": QuantizerConfig,
    "speaker_encoder": SpeakerConfig, "prenet": PrenetConfig, "decoder": DecoderConfig,
}


@dataclass(frozen=True)
class BiCodecConfig:
    """Everything BiCodec reads from ``config.yaml`` (Spark-TTS-0.5B values by default)."""

    sample_rate: int = 16000
    ref_segment_duration: float = 6.0  # seconds of reference audio for the global codes
    latent_hop_length: int = 320  # samples per semantic code
    mel_params: MelConfig = field(default_factory=MelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    speaker_encoder: SpeakerConfig = field(default_factory=SpeakerConfig)
    prenet: PrenetConfig = field(default_factory=PrenetConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BiCodecConfig:
        """Read a config.yaml dict; each key is looked up at top level and under ``audio_tokenizer``."""
        nested = raw.get("audio_tokenizer") or {}
        kw: dict[str, Any] = {}
        for name in ("sample_rate", "ref_segment_duration", "latent_hop_length"):
            value = raw.get(name, nested.get(name))
            if value is not None:
                kw[name] = value
        for name, section_cls in _SECTIONS.items():
            section = nested.get(name, raw.get(name))
            if section is not None:
                kw[name] = _section(section_cls, name, section)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError on values this implementation cannot run."""
        if self.speaker_encoder.fsq_num_quantizers != 1:
            n = self.speaker_encoder.fsq_num_quantizers
            raise ValueError(f"fsq_num_quantizers={n}; only 1 is supported")
        if int(np.prod(self.decoder.rates)) != self.latent_hop_length:
            raise ValueError(f"decoder rates {self.decoder.rates} must multiply to {self.latent_hop_length}")
        if self.mel_params.num_mels != self.speaker_encoder.input_dim:
            raise ValueError("mel_params.num_mels must equal speaker_encoder.input_dim")
        if self.prenet.use_tanh_at_final:
            raise ValueError("prenet.use_tanh_at_final=true is not supported")


def _section(section_cls: type, name: str, values: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - fields - _TRAINING_KEYS.get(name, set())
    if unknown and name in _LENIENT_SECTIONS:
        warnings.warn(f"ignoring unknown keys in BiCodec config section {name!r}: {sorted(unknown)}",
                      stacklevel=3)
    elif unknown:
        raise ValueError(f"unknown keys in BiCodec config section {name!r}: {sorted(unknown)}; "
                         f"expected some of {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    return section_cls(**kw)


class BiCodec(nn.Module):
    """BiCodec tokenizer and decoder at 16 kHz. Build with :meth:`from_dir`."""

    def __init__(self, cfg: BiCodecConfig) -> None:
        super().__init__()
        self.config = cfg
        enc, q, pre = cfg.encoder, cfg.quantizer, cfg.prenet
        self.encoder = Encoder(enc.input_channels, enc.vocos_dim, enc.vocos_intermediate_dim,
                               enc.vocos_num_layers, enc.out_channels, enc.sample_ratios)
        self.quantizer = FactorizedVQ(q.input_dim, q.codebook_size, q.codebook_dim)
        sp = cfg.speaker_encoder
        self.speaker_encoder = SpeakerEncoder(sp.input_dim, sp.out_dim, sp.latent_dim, sp.token_num,
                                              list(sp.fsq_levels))
        self.prenet = Prenet(pre.input_channels, pre.vocos_dim, pre.vocos_intermediate_dim,
                             pre.vocos_num_layers, pre.out_channels, pre.condition_dim, pre.sample_ratios)
        self.decoder = WaveGenerator(cfg.decoder.input_channel, cfg.decoder.channels,
                                     list(cfg.decoder.rates), list(cfg.decoder.kernel_sizes))
        m = cfg.mel_params
        fb = slaney_filterbank(m.sample_rate, m.n_fft, m.num_mels, m.mel_fmin, m.mel_fmax)
        self.register_buffer("mel_fb", torch.from_numpy(fb).float(), persistent=False)  # (F, M)
        self.register_buffer("mel_window", torch.hann_window(m.win_length, device="cpu"), persistent=False)
        self.wav2vec2: Wav2Vec2 | None = None

    @property
    def sample_rate(self) -> int:
        """Audio rate in and out (16000)."""
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        """Samples per semantic code (320)."""
        return self.config.latent_hop_length

    @property
    def frame_rate(self) -> float:
        """Semantic codes per second (50.0)."""
        return self.config.sample_rate / self.config.latent_hop_length

    @property
    def semantic_codebook_size(self) -> int:
        """Semantic codes are in [0, semantic_codebook_size)."""
        return self.config.quantizer.codebook_size

    @property
    def global_codebook_size(self) -> int:
        """Global codes are in [0, prod(fsq_levels)) (4096)."""
        return self.speaker_encoder.quantizer.codebook_size

    @property
    def num_global_tokens(self) -> int:
        """Global codes per utterance (32)."""
        return self.config.speaker_encoder.token_num

    @property
    def ref_clip_length(self) -> int:
        """Samples in the speaker reference clip: the duration rounded down to whole hops (96000)."""
        c = self.config
        return int(c.sample_rate * c.ref_segment_duration) // c.latent_hop_length * c.latent_hop_length

    @property
    def _dtype(self) -> torch.dtype:
        return self.quantizer.codebook.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.quantizer.codebook.weight.device

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        with_wav2vec2: bool = True,
        decode_dtype: torch.dtype | None = None,
    ) -> BiCodec:
        """Load a BiCodec checkpoint directory strictly.

        Args:
            path: the ``BiCodec`` directory (config.yaml, model.safetensors, wav2vec2-large-xlsr-53/).
            device, dtype: where and in what precision to run (float32 reproduces the reference).
            with_wav2vec2: also load the wav2vec2 model, needed only by :meth:`encode_semantic`.
            decode_dtype: precision of the decoder alone (see :meth:`set_decode_dtype`); None: ``dtype``.
        """
        path = Path(path)
        config = _read_config(path / "config.yaml")
        model = build_for_loading(lambda: cls(config))  # no random init: load_strict fills every tensor
        weights = path / "model.safetensors"
        state = fold_weight_norm(read_safetensors(weights))
        load_strict(model, state, str(weights), ignore_unexpected=_UNUSED_PREFIXES)
        if with_wav2vec2:
            model.wav2vec2 = Wav2Vec2.from_dir(path / WAV2VEC2_DIR, num_layers=max(FEATURE_LAYERS))
        logger.info("loaded BiCodec from %s", path)
        model = model.to(device=device, dtype=dtype).eval()
        return model.set_decode_dtype(decode_dtype) if decode_dtype is not None else model

    def set_decode_dtype(self, dtype: torch.dtype) -> BiCodec:
        """Run the decoder (prenet and wave generator) in ``dtype``; tokenisation is unchanged.

        bfloat16 roughly halves the decoding time on CPUs with bf16 matrix units, at an accuracy
        cost measured by ``bench/vocoder.py`` (float32 reproduces the reference). Returns self.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"decode dtype must be a floating point type, got {dtype}")
        self.prenet.to(dtype)
        self.decoder.to(dtype)
        return self

    @property
    def decode_dtype(self) -> torch.dtype:
        """The precision the decoder runs in."""
        return self.decoder.model[0].weight.dtype

    def reference_clip(self, wav: np.ndarray) -> np.ndarray:
        """The speaker reference: the first ``ref_segment_duration`` seconds, tiled when shorter.

        Args:
            wav: (N,) 16 kHz samples.

        Returns:
            (ref_clip_length,) samples, 96000 with the published config.
        """
        n = self.ref_clip_length
        if len(wav) == 0:
            raise ValueError("cannot take a reference clip of empty audio")
        if len(wav) < n:
            wav = np.tile(wav, n // len(wav) + 1)
        return wav[:n]

    @torch.inference_mode()
    def reference_mel(self, clips: torch.Tensor) -> torch.Tensor:
        """Linear-magnitude slaney mel spectrogram (centre-padded STFT, Hann window).

        Args:
            clips: (B, N) float waveforms, normally reference clips of 96000 samples.

        Returns:
            (B, num_mels, N // hop + 1) float32, (B, 128, 301) for reference clips.
        """
        m = self.config.mel_params
        spec = torch.stft(clips.float(), m.n_fft, hop_length=m.hop_length, win_length=m.win_length,
                          window=self.mel_window.float(), center=True, pad_mode="reflect", normalized=False,
                          onesided=True, return_complex=True).abs()  # (B, F, frames)
        return torch.matmul(spec.transpose(1, 2), self.mel_fb.float()).transpose(1, 2)

    @torch.inference_mode()
    def encode_global(self, wavs: list[np.ndarray]) -> torch.Tensor:
        """Global (speaker) codes from each waveform's reference clip; wav2vec2 is not run.

        Args:
            wavs: B arrays (N_i,) of 16 kHz float32 mono, volume-normalised (gpa.audio.load_audio).

        Returns:
            (B, num_global_tokens) int64 in [0, global_codebook_size).
        """
        check_batch(wavs)
        clips = torch.from_numpy(np.stack([self.reference_clip(np.asarray(w, np.float32)) for w in wavs]))
        mel = self.reference_mel(clips.to(self._device))  # (B, M, frames)
        return self.speaker_encoder.tokenize(mel.to(self._dtype))

    @torch.inference_mode()
    def wav2vec2_features(self, wavs: list[np.ndarray]) -> list[torch.Tensor]:
        """Content features: the mean of wav2vec2 hidden states 11, 14 and 16.

        Each item runs on its own (the reference normalises and encodes one utterance at a time),
        so results never depend on what else is in the batch.

        Args:
            wavs: B arrays (N_i,) of 16 kHz float32 mono, N_i >= 400.

        Returns:
            B tensors (T_i, hidden_size) with T_i = (N_i - 400) // 320 + 1.
        """
        check_batch(wavs)
        if self.wav2vec2 is None:
            raise RuntimeError("this BiCodec was loaded with with_wav2vec2=False")
        out = []
        for i, wav in enumerate(wavs):
            if self.wav2vec2.num_frames(len(wav)) < 1:
                raise ValueError(f"audio {i} has {len(wav)} samples; wav2vec2 needs at least 400 (25 ms)")
            x = torch.from_numpy(normalize_input(wav))[None].to(self._device, self._dtype)  # (1, N)
            a, b, c = self.wav2vec2.hidden_states(x, FEATURE_LAYERS)
            out.append(((a + b + c) / 3)[0])
        return out

    @torch.inference_mode()
    def encode_semantic(self, wavs: list[np.ndarray]) -> list[torch.Tensor]:
        """Semantic codes, 50 per second.

        Args:
            wavs: B arrays (N_i,) of 16 kHz float32 mono, N_i >= 400.

        Returns:
            B tensors (T_i,) int64 in [0, semantic_codebook_size), T_i = (N_i - 400) // 320 + 1.
        """
        # One item at a time: the encoder's convolutions would otherwise see the padding.
        return [self.quantizer.tokenize(self.encoder(f.T[None]))[0] for f in self.wav2vec2_features(wavs)]

    @torch.inference_mode()
    def decode(self, semantic: torch.Tensor, global_codes: torch.Tensor) -> torch.Tensor:
        """Waveform from semantic and global codes.

        Args:
            semantic: (B, T) integer codes in [0, semantic_codebook_size).
            global_codes: (B, num_global_tokens) integer codes in [0, global_codebook_size).

        Returns:
            (B, hop_length * T) float32 samples at 16 kHz in [-1, 1].
        """
        semantic, global_codes = self.check_codes(semantic, global_codes)
        cond = self.decode_condition(global_codes)  # (B, out_dim)
        x = self.prenet(self.decode_latents(semantic), cond)  # (B, C, T)
        wav = self.decoder(x + cond[:, :, None])  # (B, 1, hop * T)
        return wav[:, 0].float()

    def incremental_decoder(self, global_codes: torch.Tensor) -> IncrementalDecoder:
        """A decoder state for one stream of semantic codes with these global codes.

        Push codes as they come and get the waveform samples that are final; the concatenated
        output equals :meth:`decode` of all the codes. See :mod:`gpa.codecs.bicodec_stream`.

        Args:
            global_codes: (B, num_global_tokens) integer codes in [0, global_codebook_size).
        """
        return IncrementalDecoder(self, global_codes)

    @torch.inference_mode()
    def decode_condition(self, global_codes: torch.Tensor) -> torch.Tensor:
        """The speaker condition of the decoder: checked global codes (B, G) -> (B, out_dim)."""
        return self.speaker_encoder.detokenize(global_codes).to(self.decode_dtype)

    @torch.inference_mode()
    def decode_latents(self, semantic: torch.Tensor) -> torch.Tensor:
        """Codebook lookup of the decoder: checked semantic codes (B, T) -> (B, C, T)."""
        return self.quantizer.detokenize(semantic).to(self.decode_dtype)

    def check_codes(
        self, semantic: torch.Tensor, global_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate codes for :meth:`decode`: shapes (B, T) and (B, G), integers in range; as int64."""
        return check_codes(semantic, global_codes, self.num_global_tokens, self.semantic_codebook_size,
                           self.global_codebook_size, self._device)



def _read_config(path: Path) -> BiCodecConfig:
    if not path.is_file():
        raise CheckpointError(f"missing BiCodec config file: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return BiCodecConfig.from_dict(raw)
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad BiCodec config {path}: {e}") from e
