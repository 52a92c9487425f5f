"""``gpa eval``: parse, load the model, test sets and judges, call :func:`gpa.evaluation.evaluate`, write the report.

``gpa.cli`` wires it in with ``add_parser(sub, fmt)`` and ``run(args)``; :func:`main` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpa.audio import AudioError
from gpa.cli_options import add_speed_flags, speed_options
from gpa.evaluation.deps import JudgeUnavailable
from gpa.evaluation.judges import ASR_MODELS, JudgeConfig, get_judges
from gpa.evaluation.manifest import REFERENCE_MODES, TASKS, EvalSpec, TestSet, load_manifest
from gpa.evaluation.report import format_table
from gpa.evaluation.run import evaluate

logger = logging.getLogger(__name__)


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("eval", help="evaluate a checkpoint (ASR, TTS, VC) with independent judges "
                       "(needs the 'eval' extra)", formatter_class=fmt)
    p.add_argument("--model", default=None,
                   help="GPA checkpoint directory (default: $GPA_MODEL, else the bundled GPA-nano)")
    p.add_argument("--judges-only", action="store_true",
                   help="no model (--model is ignored): only the judges' scores on the recordings (ground-truth rows)")
    p.add_argument("--manifest", action="append", type=Path, required=True,
                   help="a test set: JSONL of {audio, text, speaker} (repeatable)")
    p.add_argument("--references", type=Path, default=None,
                   help="JSONL manifest of reference voices for TTS/VC (default: each test set itself)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks: asr, tts, vc")
    p.add_argument("--limit", type=int, default=None, help="inputs per test set (a seeded subset; default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, the pairing and the model's sampling")
    p.add_argument("--beam-size", type=int, default=None, help="the model's ASR beam width (default: greedy)")
    p.add_argument("--tts-reference", default="same-speaker", choices=REFERENCE_MODES,
                   help="TTS voice: another recording of the text's speaker, or of another speaker")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--save-audio", type=Path, default=None, help="keep the synthesised audio in this directory")
    p.add_argument("--no-warmup", action="store_true", help="time the first model call of each task too")
    p.add_argument("--device", default=None, help="torch device for the model (default: cuda if available)")
    add_speed_flags(p)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: task's)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: task's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: task's)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="repetition penalty (default: task's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (default: task's)")
    p.add_argument("--judge-asr", default="tiny.en", choices=ASR_MODELS, help="Whisper model of the ASR judge")
    p.add_argument("--judge-threads", type=int, default=2, help="CPU threads of the ASR judge")
    p.add_argument("--judge-beam-size", type=int, default=1, help="beam size of the ASR judge")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")
    return p


def _spec(args: argparse.Namespace) -> EvalSpec:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return EvalSpec(tasks=tasks, limit=args.limit, seed=args.seed, tts_reference=args.tts_reference,
                    warmup=not args.no_warmup, asr_beam_size=args.beam_size)


def _test_sets(paths: Sequence[Path]) -> list[TestSet]:
    sets = [load_manifest(p) for p in paths]
    names = [s.name for s in sets]
    # Two manifests with one file name (a/test.jsonl, b/test.jsonl) get their parent folder in the name.
    return [TestSet(f"{s.path.parent.name}/{s.name}", s.path, s.items) if names.count(s.name) > 1 else s
            for s in sets]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


class UsageError(ValueError):
    """Arguments that parse but do not fit together (exit code 2)."""


def run(args: argparse.Namespace) -> int:
    """Run ``gpa eval`` from parsed arguments; returns the exit code (a missing judge package: 1, usage: 2)."""
    try:
        return _run(args)
    except UsageError as e:
        print(f"gpa eval: error: {e}", file=sys.stderr)
        return 2
    except JudgeUnavailable as e:
        print(f"gpa eval: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.judges_only:
        args.model = None  # the judges alone, whatever $GPA_MODEL says
    else:
        from gpa.checkpoint import resolve_model
        from gpa.weights import CheckpointError

        try:
            args.model = resolve_model(args.model)
        except CheckpointError as e:
            raise UsageError(f"{e}; or --judges-only to score the recordings") from e
    try:
        spec = _spec(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    test_sets = _test_sets(args.manifest)
    references = load_manifest(args.references) if args.references else None
    judges = get_judges(JudgeConfig(args.judge_asr, args.judge_threads, args.judge_beam_size))
    model = None
    if args.model:
        from gpa.api import load

        model = load(args.model, device=args.device, **speed_options(args))
    settings = {"model": str(Path(args.model).resolve()) if args.model else None,
                **(model.speed_settings() if model is not None else {})}
    report = evaluate(model, test_sets, spec, judges, references, _options(args), args.save_audio,
                      progress=not args.no_progress, settings=settings)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.out)
    print(format_table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gpa eval`` on its own, as ``gpa.cli`` runs it (``argv`` with or without the leading "eval").

    Returns 0 when done, 1 for bad input (manifest, audio, checkpoint) or a missing judge, 2 for a usage error.
    """
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="gpa", formatter_class=fmt)
    add_parser(parser.add_subparsers(dest="command", required=True), fmt)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["eval"] else ["eval", *argv])
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (AudioError, ValueError, OSError) as e:
        print(f"gpa eval: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
