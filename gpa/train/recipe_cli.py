"""``gpa recipe nano OUT``: rebuild GPA-nano from scratch (corpus, codec, tokenizer, LLM, bundle), resumably."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from typing import Any


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Register ``recipe`` on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("recipe", help="rebuild a bundled model from scratch (resumable)", formatter_class=fmt)
    p.add_argument("name", choices=["nano"], help="which recipe")
    p.add_argument("out", help="work folder: every step's output goes here; re-running resumes")
    p.add_argument("--corpus", default="", help="use this existing `gpa corpus` folder instead of building one")
    p.add_argument("--corpus-extra", action="append", default=[], metavar="DIR",
                   help="use this existing folder for the next extra corpus, in the recipe's order (repeatable): "
                        "gpa corpus --skip-sentences 1500 --sentences 10000 --heldout-sentences 0 "
                        "--voices-per-sentence 1 --no-real, then --skip-sentences 11500 --sentences 20000 (same flags)")
    p.add_argument("--speaker-minutes", type=float, default=None,
                   help="joint token-decoder + speaker-encoder training time (default: the recipe's)")
    p.add_argument("--decoder-minutes", type=float, default=None,
                   help="the final token decoder's training time (default: the recipe's, 4 on a GPU, 300 on CPU)")
    p.add_argument("--max-steps", type=int, default=None, help="LLM optimizer steps (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the LLM training (default: torch's)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes for features and gpa prepare; threads of codec training")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (stderr)")
    return p


def run(args: argparse.Namespace) -> int:
    """Carry out ``gpa recipe``; prints {"bundle": path} as JSON."""
    from gpa.train.nano_recipe import NanoRecipe, run_recipe  # torch and the codecs load here, not at parse time

    logging.getLogger().setLevel(args.log_level)
    d = NanoRecipe()
    pick = lambda v, default: default if v is None else v  # noqa: E731
    recipe = replace(d, corpus_dir=args.corpus, extra_corpus_dirs=tuple(args.corpus_extra),
                     speaker_minutes=pick(args.speaker_minutes, d.speaker_minutes),
                     decoder_training=replace(d.decoder_training,
                                              minutes=pick(args.decoder_minutes, d.decoder_training.minutes)),
                     decoder_minutes_cpu=pick(args.decoder_minutes, d.decoder_minutes_cpu),
                     workers=max(1, args.workers),
                     train={**d.train, "max_steps": pick(args.max_steps, d.train["max_steps"]),
                            "threads": pick(args.threads, d.train.get("threads", 0))})
    bundle = run_recipe(args.out, recipe, progress=not args.no_progress)
    print(json.dumps({"bundle": str(bundle)}))
    return 0
