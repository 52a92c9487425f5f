"""The Python API: ``model = gpa.load(dir)``, then ``model.asr``, ``model.tts`` and ``model.vc``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpa import native
from gpa.audio import SAMPLE_RATE, AudioInput, load_audio
from gpa.checkpoint import Checkpoint, load_codecs, load_lm, resolve_model
from gpa.codecs.bicodec import BiCodec
from gpa.codecs.glm import GLMTokenizer
from gpa.config import (
    ASR_FALLBACK,
    DEFAULT_SAMPLING,
    KV_CACHE_DTYPES,
    TOKENIZER_DTYPES,
    ASRFallback,
    SamplingParams,
    Task,
)
from gpa.generation import GenerationRequest, beam_search, generate
from gpa.logits import allowed_ids, stop_ids, task_filters
from gpa.model import GPALM
from gpa.prompts import Prompt, asr_prompt, tts_prompt, vc_prompt, voice_prefix
from gpa.quant import int8_gemm_linears
from gpa.text import compression_ratio, split_text
from gpa.vocab import Vocab
from gpa.voices import BuiltinVoice, builtin_voices, default_voice, lookup

logger = logging.getLogger(__name__)

Audio = AudioInput | tuple[np.ndarray, int]
VOICE_CACHE_SIZE = 64  # reference voices kept tokenized  # a path, encoded bytes, or (samples, sample_rate)


@dataclass(frozen=True)
class Voice:
    """A reference speaker, tokenized once and reusable across requests."""

    global_codes: torch.Tensor  # (32,) int64 BiCodec speaker codes
    semantic_codes: torch.Tensor | None = None  # (T,) the reference's content codes (prompt continuation)
    text: str | None = None  # the reference's transcript (prompt continuation)


def _load(audio: Audio, normalize: bool, what: str) -> np.ndarray:
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise TypeError(f"{what}: an audio tuple must be (samples, sample_rate)")
        return load_audio(np.asarray(audio[0]), int(audio[1]), normalize=normalize, name=what)
    return load_audio(audio, normalize=normalize, name=what if not isinstance(audio, (str, Path)) else None)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


VOCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GPA:
    """A loaded GPA checkpoint: LLM, text vocabulary, BiCodec and the GLM speech tokenizer."""

    def __init__(self, lm: GPALM, vocab: Vocab, bicodec: BiCodec, glm: GLMTokenizer, root: Path | None = None) -> None:
        self.lm, self.vocab, self.bicodec, self.glm = lm, vocab, bicodec, glm
        self.root = root  # the checkpoint directory (None when built from parts): its built-in voices live there
        self._builtin: dict[str, BuiltinVoice] | None = None  # read on first use
        self.device = lm.head_weight().device
        self.sample_rate = bicodec.sample_rate
        self._allowed = {t: allowed_ids(vocab, t, lm.config.vocab_size) for t in Task}
        self._filters = {t: task_filters(vocab, t, lm.config.vocab_size, self._allowed[t]) for t in Task}
        self._stops = {t: stop_ids(vocab, t) for t in Task}
        self._voices: OrderedDict[tuple[str, str | None], Voice] = OrderedDict()  # LRU of tokenized references
        self._voice_lock = threading.Lock()
        self.tokenizer_dtype = torch.float32  # audio tokenizers' compute dtype (see from_dir)
        self.tokenizer_precision = "float32"  # and their precision as chosen (gpa.config.TOKENIZER_DTYPES)

    def _tokenizing(self) -> contextlib.AbstractContextManager:
        """The precision the audio tokenizers run in: exact float32, or bfloat16 autocast."""
        if self.tokenizer_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.tokenizer_dtype)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, quantize: str | None = None,
                 vocoder_dtype: str | torch.dtype | None = None, tokenizer_dtype: str | None = None,
                 native_decode: bool | None = None, kv_cache_dtype: str | None = None,
                 int8_prefill: bool | None = None) -> GPA:
        """Load an official-layout checkpoint directory, strictly.

        Args:
            path: the directory (config.json, model.safetensors, tokenizer.json, BiCodec/, glm-4-voice-tokenizer/).
            device: default CUDA when available, else CPU.
            dtype: the LLM's dtype (with int8 / int4: of its activations, embedding and KV cache); default the
                checkpoint's ``inference.json`` setting, else bfloat16 on CUDA or with int8, else float32
                (int4's kernel takes bf16 inputs either way; float32 around it was faster: 0.3B decode
                step at batch 1, 22.5 ms against 30.0 with bfloat16).
                With int8 on CPU, float32 activations were faster for GPA-nano (its LLM 0.111 -> 0.092
                RTF: bf16 attention and norms cost more in torch's small-op kernels than they save) but
                not measurably for the 0.3B model in the engine (TTS c=1 RTF 2.35 vs 2.36), where they
                cost 1.9 GB more memory (embedding and KV cache).
            quantize: "none", "int8" for weight-only int8 LLM layers (CPU speed), or "int4" (CPU only: half
                int8's weight bytes per step, less accurate; see :mod:`gpa.quant`).
            vocoder_dtype: "float32" or "bfloat16" (about 1.7x faster on CPUs with bf16 units) for the codec's
                decoder (tokenisation: ``tokenizer_dtype``).
            tokenizer_dtype: "float32" (exact), "bfloat16": the audio tokenizers (speech -> codes for ASR,
                VC and reference voices) under bf16 autocast, ~2.2x faster on CPU; a few codes change
                (GPA-nano, real speech: 99.7 % of prompt ids unchanged; see the README); or "int8": bfloat16 with
                the encoders' linear layers multiplying in int8 (:class:`gpa.quant.Int8GemmLinear`; 0.3B shapes,
                10 s: ~2.15 -> ~1.3 s; needs gpa.native's kernels, else bfloat16).
            native_decode: run decode steps through gpa's C++ kernels (:mod:`gpa.native`, CPU; compiled once,
                ~30 s; torch's path where they cannot be built): 0.3B int4 decode step 23.3 -> ~7 ms at 300
                tokens of context (``bench/decode_step.py --native``). With int8/int4 weights or a bf16 model
                the KV cache is then int8 (see ``kv_cache_dtype``). Once loaded, the kernels also serve int4
                products (integer arithmetic, AVX512-VNNI) and a bf16 decoder's Snake activations.
            kv_cache_dtype: the KV cache's storage (:data:`gpa.config.KV_CACHE_DTYPES`): "auto" (the LLM's dtype;
                int8 under native decoding with int8/int4 weights or a bf16 model), "float32", "bfloat16", or
                "int8": int8 codes with a float32 scale per position and head, half of bfloat16's bytes, which a
                decode step at several rows or a long context spends much of its time reading (0.3B, 8 rows at 300
                positions: attention ~12 -> ~6-7 ms per step with the native kernels; prefills read it back as
                bf16). Its accuracy cost is small (``bench/accuracy.py``, 0.3B shapes: logits 1.68 -> 1.75 % from
                float32 with int8 weights).
            int8_prefill: with int8/int4 weights, passes over several tokens per row (prompts) multiply in int8
                with activations quantized per token (:func:`gpa.quant.int8_products`): 0.3B, 629-token prefill
                ~1.3 -> ~0.8 s; logits error from float32 (``bench/accuracy.py``) int8 1.75 -> 1.88 %, int4
                18.7 -> 6.1 % (its prompts then run on int8 weights). Needs gpa.native's kernels (else off).
            quantize, vocoder_dtype, tokenizer_dtype, native_decode, kv_cache_dtype, int8_prefill and dtype left None
            take the checkpoint's ``inference.json`` settings for the device type (the bundled GPA-nano asks for
            int8, a bfloat16 decoder, float32 activations and the native kernels on CPU), else the defaults above.
        """
        ckpt = Checkpoint.open(path)
        device = torch.device(device) if device is not None else _default_device()
        wanted = ckpt.inference_defaults(device)
        quantize = quantize or wanted.get("quantize", "none")
        if dtype is None and "dtype" in wanted:
            if wanted["dtype"] not in LLM_DTYPES:
                raise ValueError(f"{ckpt.inference_file}: unknown dtype {wanted['dtype']!r}; expected one of "
                                 f"{tuple(LLM_DTYPES)}")
            dtype = LLM_DTYPES[wanted["dtype"]]
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" or quantize == "int8" else torch.float32)
        vocoder_dtype = vocoder_dtype or wanted.get("vocoder_dtype", "float32")
        if isinstance(vocoder_dtype, str):
            if vocoder_dtype not in VOCODER_DTYPES:
                raise ValueError(f"unknown vocoder_dtype {vocoder_dtype!r}; expected one of {tuple(VOCODER_DTYPES)}")
            vocoder_dtype = VOCODER_DTYPES[vocoder_dtype]
        tokenizer_dtype = tokenizer_dtype or wanted.get("tokenizer_dtype", "float32")
        if tokenizer_dtype not in TOKENIZER_DTYPES:
            raise ValueError(f"unknown tokenizer_dtype {tokenizer_dtype!r}; expected one of {TOKENIZER_DTYPES}")
        int8_prefill = bool(wanted.get("int8_prefill", False) if int8_prefill is None else int8_prefill)
        if int8_prefill and quantize == "none":
            raise ValueError("int8_prefill needs quantized LLM weights (quantize int8 or int4)")
        if (tokenizer_dtype == "int8" or int8_prefill) and not _int8_gemm_available(device):
            logger.warning("int8 products need gpa.native's kernels on CPU (%s): the tokenizers run in bfloat16 and "
                           "prompts as without int8_prefill", native.unavailable_reason() or f"device {device}")
            tokenizer_dtype = "bfloat16" if tokenizer_dtype == "int8" else tokenizer_dtype
            int8_prefill = False
        bicodec, glm = load_codecs(ckpt, device=device)
        if vocoder_dtype != torch.float32:
            bicodec.set_decode_dtype(vocoder_dtype)
        vocab = Vocab.from_dir(ckpt.root, glm_codebook_size=glm.codebook_size)
        lm = load_lm(ckpt, device=device, dtype=dtype, quantize=quantize, int8_prefill=int8_prefill)
        lm.native_decode = bool(wanted.get("native_decode", False) if native_decode is None else native_decode)
        kv_cache_dtype = kv_cache_dtype or wanted.get("kv_cache_dtype", "auto")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of {KV_CACHE_DTYPES}")
        lm.kv_cache_dtype = kv_cache_dtype
        if lm.config.vocab_size < vocab.size:
            raise ValueError(f"{ckpt.llm_config}: vocab_size {lm.config.vocab_size} < tokenizer size {vocab.size}")
        model = cls(lm, vocab, bicodec, glm, root=ckpt.root)
        model.tokenizer_precision = tokenizer_dtype
        model.tokenizer_dtype = torch.float32 if tokenizer_dtype == "float32" else torch.bfloat16
        if model.tokenizer_dtype != torch.float32 and isinstance(bicodec, BiCodec):
            # Parts that only ever run under the tokenizers' autocast: their matrices stored in its dtype, which
            # autocast would otherwise cast again on every call (0.3B, 10 s of ASR input: ~0.28 s of copies).
            for part in (glm.encoder, bicodec.wav2vec2, bicodec.encoder):
                _store_matrices(part, model.tokenizer_dtype)
        if tokenizer_dtype == "int8":
            parts = (glm.encoder, bicodec.wav2vec2, bicodec.encoder) if isinstance(bicodec, BiCodec) else (
                bicodec.whisper,)  # GPA-nano: its content encoder (Whisper tiny.en) makes both code streams
            count = sum(int8_gemm_linears(part) for part in parts)
            logger.info("audio tokenizers: %d linear layers multiply in int8", count)
        return model

    def speed_settings(self) -> dict[str, Any]:
        """The speed and precision settings as loaded (``from_dir``'s arguments after defaults and fallbacks)."""
        return {"quantize": self.lm.weight_quant, "dtype": str(self.lm.head_weight().dtype).removeprefix("torch."),
                "vocoder_dtype": str(self.bicodec.decode_dtype).removeprefix("torch."),
                "tokenizer_dtype": self.tokenizer_precision, "native_decode": self.lm.native_decode,
                "kv_cache_dtype": self.lm.kv_cache_dtype, "int8_prefill": self.lm.int8_prefill,
                "device": str(self.device)}

    # --- options ----------------------------------------------------------------------------------

    @staticmethod
    def sampling(task: Task | str, **options: Any) -> SamplingParams:
        """The task's default sampling with ``options`` (SamplingParams fields) overriding; None keeps a default."""
        task = Task.parse(task)
        return DEFAULT_SAMPLING[task].replace(**{k: v for k, v in options.items() if v is not None})

    # --- voices -------------------------------------------------------------------------------------

    def builtin_voices(self) -> dict[str, BuiltinVoice]:
        """The checkpoint's built-in voices (``voices/``) by name, sorted; {} when it has none."""
        if self._builtin is None:
            self._builtin = builtin_voices(self.root) if self.root is not None else {}
        return dict(self._builtin)

    def default_voice(self) -> str | None:
        """The name of the built-in voice used when none is given (None without built-in voices)."""
        return default_voice(self.builtin_voices())

    def voice(self, reference: Audio, text: str | None = None) -> Voice:
        """Tokenize a reference speaker; with its transcript ``text`` TTS continues the reference.

        ``reference`` is audio (a path, encoded bytes or ``(samples, sample_rate)``), or the name of a
        built-in voice (:meth:`builtin_voices`): a string is a file when that file exists, else a
        voice name. A built-in voice gives its audio only; its transcript is used only when passed
        as ``text``.
        """
        if text is not None and not text.strip():
            raise ValueError("reference_text is empty")
        if isinstance(reference, str) and not os.path.exists(reference):  # (Path.exists raises on long names)
            reference = lookup(reference, self.builtin_voices()).audio_path
        wav = _load(reference, normalize=True, what="reference")
        # Requests often reuse a reference: its tokens are cached by content (not by name or path).
        key = (hashlib.sha1(wav.tobytes()).hexdigest(), text)
        with self._voice_lock:
            if key in self._voices:
                self._voices.move_to_end(key)
                return self._voices[key]
        with self._tokenizing():
            codes = self.bicodec.encode_global([wav])[0].cpu()
            semantic = None if text is None else self.bicodec.encode_semantic([wav])[0].cpu()
        voice = Voice(codes, semantic, text)
        with self._voice_lock:
            self._voices[key] = voice
            if len(self._voices) > VOICE_CACHE_SIZE:
                self._voices.popitem(last=False)
        return voice

    def _as_voice(self, reference: Audio | Voice | None, text: str | None) -> Voice:
        if reference is None:
            name = self.default_voice()
            if name is None:
                raise ValueError("no reference voice given, and this model has no built-in voices; pass reference=")
            reference = name
        if isinstance(reference, Voice):
            if text is not None and reference.text is None:
                raise ValueError("reference_text given with a Voice built without it; use model.voice(audio, text)")
            return reference
        return self.voice(reference, text)

    # --- tasks --------------------------------------------------------------------------------------

    def asr(self, audio: Audio, fallback: ASRFallback | None = ASR_FALLBACK, beam_size: int | None = None,
            **options: Any) -> str:
        """Transcribe speech. ``options``: SamplingParams fields (default greedy).

        ``fallback``: a transcript that loops (compresses too well) is decoded again at higher
        temperatures, as whisper does (:class:`gpa.config.ASRFallback`); None keeps the first decode.
        ``beam_size``: with temperature 0, keep this many hypotheses (beam search, as whisper's
        ``beam_size``) instead of the greedy one; the fallback's retries sample as usual.
        """
        return self.asr_batch([audio], fallback, beam_size, **options)[0]

    def asr_batch(self, audios: Sequence[Audio], fallback: ASRFallback | None = ASR_FALLBACK,
                  beam_size: int | None = None, **options: Any) -> list[str]:
        """Transcribe several inputs in one batch (``fallback`` and ``beam_size`` as in :meth:`asr`, per input;
        a beam search runs input by input)."""
        params = self.sampling(Task.ASR, **options)
        if beam_size is not None and beam_size < 1:
            raise ValueError(f"beam_size must be >= 1 or None, got {beam_size}")
        prompts = self.asr_prompts(audios)
        beam = beam_size if beam_size is not None and beam_size > 1 and params.temperature == 0 else None
        texts = [self.vocab.decode_text(ids).strip() for ids in self._generate(Task.ASR, prompts, params, beam)]
        for retry in fallback.retries(params) if fallback is not None else []:
            redo = [i for i, t in enumerate(texts) if fallback.needs_retry(compression_ratio(t))]
            if not redo:
                break
            logger.info("ASR fallback: %d transcript(s) loop; decoding again at temperature %g", len(redo),
                        retry.temperature)
            outputs = self._generate(Task.ASR, [prompts[i] for i in redo], retry)
            for i, ids in zip(redo, outputs, strict=True):
                texts[i] = self.vocab.decode_text(ids).strip()
        return texts

    def asr_prompts(self, audios: Sequence[Audio]) -> list[Prompt]:
        """ASR prompts: GLM reads the audio at its own level (as the authors feed it), BiCodec the
        volume-normalised audio it was trained on."""
        raw = [_load(a, normalize=False, what=f"audio {i}") for i, a in enumerate(audios)]
        normed = [_load((w, SAMPLE_RATE), normalize=True, what=f"audio {i}") for i, w in enumerate(raw)]
        with self._tokenizing():
            glm_codes = self.glm.encode(raw)
            semantic = self.bicodec.encode_semantic(normed)
        return [asr_prompt(self.vocab, g, s) for g, s in zip(glm_codes, semantic, strict=True)]

    def tts(self, text: str, reference: Audio | Voice | None = None, reference_text: str | None = None,
            **options: Any) -> tuple[np.ndarray, int]:
        """Speak ``text`` in the reference's voice -> ((N,) float32 waveform, sample rate).

        ``reference``: audio, a :class:`Voice`, or a built-in voice's name (see :meth:`voice`); None: the
        model's default built-in voice.
        """
        return self.tts_batch([text], reference, reference_text, **options)[0]

    def tts_batch(self, texts: Sequence[str], reference: Audio | Voice | None = None, reference_text: str | None = None,
                  **options: Any) -> list[tuple[np.ndarray, int]]:
        """Speak several texts in one voice, in one batch.

        A text longer than :data:`gpa.text.MAX_CHARS` is cut at sentence boundaries; its pieces
        are generated in the same batch and their audio joined, so nothing is truncated.
        """
        params = self.sampling(Task.TTS, **options)
        voice = self._as_voice(reference, reference_text)
        pieces = [split_text(t) if isinstance(t, str) else [t] for t in texts]
        flat = [p for ps in pieces for p in ps] or list(texts)
        waves = [self._decode(ids, voice.global_codes)[0]
                 for ids in self._generate(Task.TTS, self.tts_prompts(flat, voice), params)]
        out, i = [], 0
        for ps in pieces:
            n = max(len(ps), 1)
            out.append((np.concatenate(waves[i : i + n]), self.sample_rate))
            i += n
        return out

    def tts_prompts(self, texts: Sequence[str], voice: Voice) -> list[Prompt]:
        """TTS prompts for ``texts`` in ``voice`` (continuing the reference when it has a transcript)."""
        return [tts_prompt(self.vocab, voice.global_codes, t, reference_text=voice.text,
                           reference_semantic=voice.semantic_codes) for t in texts]

    def vc(self, source: Audio, reference: Audio | Voice | None = None, **options: Any) -> tuple[np.ndarray, int]:
        """Say what ``source`` says in the reference's voice -> (waveform, sample rate); ``reference`` as
        in :meth:`tts`."""
        return self.vc_batch([source], reference, **options)[0]

    def vc_batch(self, sources: Sequence[Audio], reference: Audio | Voice | None = None,
                 **options: Any) -> list[tuple[np.ndarray, int]]:
        """Convert several sources to one voice, in one batch."""
        params = self.sampling(Task.VC, **options)
        voice = self._as_voice(reference, None)
        outputs = self._generate(Task.VC, self.vc_prompts(sources, voice), params)
        return [self._decode(ids, voice.global_codes) for ids in outputs]

    def vc_prompts(self, sources: Sequence[Audio], voice: Voice) -> list[Prompt]:
        """VC prompts: each source's semantic codes under ``voice``'s global codes."""
        wavs = [_load(s, normalize=True, what=f"source {i}") for i, s in enumerate(sources)]
        with self._tokenizing():
            semantic = self.bicodec.encode_semantic(wavs)
        return [vc_prompt(self.vocab, voice.global_codes, s) for s in semantic]

    # --- internals ------------------------------------------------------------------------------------

    def _generate(self, task: Task, prompts: list[Prompt], params: SamplingParams, beam_size: int | None = None
                  ) -> list[list[int]]:
        """Output ids per prompt, stop tokens removed: one batch, or with ``beam_size`` a beam search per prompt."""
        limit = self.lm.config.max_position_embeddings
        for p in prompts:
            if len(p.prompt_ids) + params.max_new_tokens > limit:
                raise ValueError(
                    f"input too long: the {task.value} prompt has {len(p.prompt_ids)} tokens and max_new_tokens "
                    f"is {params.max_new_tokens}; together at most {limit} fit the model's context")
        stop = self._stops[task]
        reqs = [self.generation_request(task, p.prompt_ids, params) for p in prompts]
        outputs = generate(self.lm, reqs) if beam_size is None else [beam_search(self.lm, r, beam_size) for r in reqs]
        return [[t for t in out if t not in stop] for out in outputs]

    def generation_request(self, task: Task, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        """A prompt with its task's output constraints and stop tokens (shared by the API and the engine)."""
        return GenerationRequest(prompt_ids, params, self._filters[task], self._stops[task], self._allowed[task],
                                 prefix=voice_prefix(self.vocab, prompt_ids))

    def _decode(self, ids: list[int], global_codes: torch.Tensor, remove_dc: bool = True) -> tuple[np.ndarray, int]:
        """Semantic ids -> waveform; the offline API removes the DC offset as the authors do."""
        if not ids:
            logger.warning("the model produced no audio tokens")
            return np.zeros(0, dtype=np.float32), self.sample_rate
        semantic = torch.tensor([self.vocab.semantic_codes(ids)], device=self.device)
        wav = self.bicodec.decode(semantic, global_codes[None].to(self.device))[0].float().cpu().numpy()
        return (wav - wav.mean() if remove_dc else wav).astype(np.float32), self.sample_rate


def _int8_gemm_available(device: torch.device) -> bool:
    """Whether gpa.native's int8 products can run on ``device`` (loading the kernels if need be)."""
    if device.type != "cpu":
        return False
    return native.load() is not None


def _store_matrices(module: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Cast the weights and biases of ``module``'s linear and convolution layers to ``dtype`` (what autocast
    computes them in; norms stay float32, as autocast keeps them)."""
    for layer in module.modules() if module is not None else ():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv1d):
            layer.to(dtype)


def load(path: str | Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, vocoder_dtype: str | torch.dtype | None = None,
         tokenizer_dtype: str | None = None, native_decode: bool | None = None, kv_cache_dtype: str | None = None,
         int8_prefill: bool | None = None) -> GPA:
    """Load a GPA checkpoint directory (see :meth:`GPA.from_dir`); no ``path``: ``$GPA_MODEL``, else the
    bundled GPA-nano (:func:`gpa.checkpoint.resolve_model`)."""
    return GPA.from_dir(resolve_model(path), device=device, dtype=dtype, quantize=quantize,
                        vocoder_dtype=vocoder_dtype, tokenizer_dtype=tokenizer_dtype, native_decode=native_decode,
                        kv_cache_dtype=kv_cache_dtype, int8_prefill=int8_prefill)
