"""``gpa corpus OUT``: build (or resume) a synthetic multi-speaker corpus; ``--list-voices`` shows the registry."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from gpa.corpus.build import CorpusConfig, build_corpus
from gpa.corpus.text import SOURCES
from gpa.corpus.voices import DEFAULT_VOICES, HELDOUT_VOICES, REGISTRY, missing_requirement

_DEFAULTS = CorpusConfig()


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Register the ``corpus`` subcommand on ``sub`` (an argparse subparsers object) and return its parser."""
    p = sub.add_parser("corpus", help="synthesise a multi-speaker speech corpus from offline voices",
                       formatter_class=fmt)
    p.add_argument("out", nargs="?", default=None, help="corpus folder (re-running resumes it)")
    p.add_argument("--sentences", type=int, default=_DEFAULTS.sentences,
                   help="train-bucket sentences, spoken by every seen voice")
    p.add_argument("--heldout-sentences", type=int, default=None,
                   help="held-out-bucket sentences (default: sentences // 10, at least 1)")
    p.add_argument("--voices", nargs="+", default=list(_DEFAULTS.voices),
                   help="voice names from --list-voices, 'default' or 'all'")
    p.add_argument("--perturbations", nargs="*", default=[],
                   help="extra pseudo-speakers per voice: p<+/-cents> pitch and/or t<factor> tempo, e.g. p+300 t0.9")
    p.add_argument("--sources", nargs="+", default=list(_DEFAULTS.sources), choices=SOURCES,
                   help="sentence sources, in round-robin order")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="sentence choice and task pairing")
    p.add_argument("--workers", type=int, default=_DEFAULTS.workers, help="engine processes at once")
    p.add_argument("--data-dir", default=None,
                   help="real recordings (cathy/, librispeech-excerpts/); default: $GPA_DATA or shared/data beside "
                        "the repository")
    p.add_argument("--no-real", action="store_true", help="leave out the real recordings")
    p.add_argument("--skip-sentences", type=int, default=0,
                   help="leave out the first N chosen train sentences (built already in another corpus part)")
    p.add_argument("--voices-per-sentence", type=int, default=None,
                   help="each train sentence spoken by this many seen voices, in rotation (default: all of them)")
    p.add_argument("--list-voices", action="store_true", help="print the voice registry as JSON lines and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")
    return p


def list_voices() -> list[dict[str, Any]]:
    """Every registry voice with its role and whether it can run here."""
    return [{**asdict(v), "default": v.name in DEFAULT_VOICES, "heldout": v.name in HELDOUT_VOICES,
             "missing": missing_requirement(v)} for v in REGISTRY.values()]


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``gpa corpus`` command; prints the summary (or the voice list) as JSON."""
    if args.list_voices:
        for row in list_voices():
            print(json.dumps(row))
        return 0
    if args.out is None:
        raise ValueError("no corpus folder given: gpa corpus OUT (or --list-voices)")
    cfg = CorpusConfig(sentences=args.sentences, heldout_sentences=args.heldout_sentences,
                       voices=tuple(args.voices), perturbations=tuple(args.perturbations),
                       sources=tuple(args.sources), seed=args.seed, workers=args.workers, data_dir=args.data_dir,
                       real=not args.no_real, skip_sentences=args.skip_sentences,
                       voices_per_sentence=args.voices_per_sentence)
    summary = build_corpus(args.out, cfg, progress=not args.no_progress)
    print(json.dumps(asdict(summary), indent=1))
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gpa corpus`` on its own (for tests and ``python -m gpa.corpus.cli``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="gpa")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(["corpus", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"gpa: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
