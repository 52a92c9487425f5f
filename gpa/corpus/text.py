"""Sentence pools from offline text, cleaned, deduplicated, with a fixed hash-based held-out split.

The split of a sentence depends on its text alone: ``sha1(split_key(text)) mod 10 == 0`` puts it in the
held-out bucket, for every voice, every engine and the real recordings alike. Adding sentences to a pool
never moves an existing one between buckets, and a held-out sentence is never trained on in any voice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HELDOUT_BUCKETS = 10  # sha1(key) mod HELDOUT_BUCKETS == HELDOUT_BUCKET -> held out (10 %)
HELDOUT_BUCKET = 0
MIN_CHARS, MAX_CHARS = 20, 200  # cleaned sentence length bounds (inclusive)

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian wordnet-base
FORTUNES_DIR = Path("/usr/share/games/fortunes")  # Debian fortunes
FORTUNE_FILES = ("fortunes", "literature", "wisdom", "people", "science")  # the clean, non-offensive ones
DEFAULT_SOURCES = ("arctic", "fortunes", "wordnet")  # Harvard sentences ship in no Debian or PyPI package (not used)
# All known sources. wordnet_glosses: WordNet's definitions ("a small mat placed under a glass ..."), ~100k
# usable phrases rich in rare words; not a default, so corpora built before it existed are chosen unchanged.
SOURCES = (*DEFAULT_SOURCES, "wordnet_glosses")

_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'\-]*[A-Za-z.!?]$")  # letters, spaces, plain punctuation
_ACRONYM = re.compile(r"[A-Z]{2,}")  # spelled out differently by each engine and judge
_BAD_RUNS = re.compile(r"--|\.\.|''|\s[,.;:!?]|[,;:]\S|(^|\s)'|'(\s|$)|-(\s|$)|(^|\s)-")


@dataclass(frozen=True)
class Sentence:
    """One cleaned sentence of a pool."""

    id: str  # "s" + 10 hex digits of sha1(split key): stable file stem, independent of pool order
    text: str  # the cleaned text the voices speak
    source: str  # one of SOURCES
    heldout: bool  # in the fixed held-out hash bucket


_NOT_KEY = re.compile(r"[^a-z']+")


def split_key(text: str) -> str:
    """The text as compared for deduplication and hashed for the split: lower case letters and apostrophes."""
    return " ".join(_NOT_KEY.sub(" ", text.lower()).split())


def _digest_key(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _heldout_digest(digest: str) -> bool:
    return int(digest, 16) % HELDOUT_BUCKETS == HELDOUT_BUCKET


def is_heldout(text: str) -> bool:
    """Whether ``text`` is in the fixed held-out bucket (independent of any seed or pool)."""
    return _heldout_digest(_digest_key(split_key(text)))


def sentence_id(text: str) -> str:
    """The stable id of a sentence: "s" + the first 10 hex digits of sha1 of its split key."""
    return "s" + _digest_key(split_key(text))[:10]


def clean(text: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> str | None:
    """``text`` with whitespace collapsed and wrapping quotes removed, or None when it is unusable.

    Unusable: non-ASCII, digits (numbers must already be spelled), symbols other than plain punctuation,
    acronyms, formatting runs ("--", "..") or a length outside [min_chars, max_chars].
    """
    t = " ".join(text.split()).strip().strip('"').strip()
    if not t or not t.isascii() or not min_chars <= len(t) <= max_chars:
        return None
    if not _ALLOWED.match(t) or _ACRONYM.search(t) or _BAD_RUNS.search(t):
        return None
    t = t[0].upper() + t[1:]
    return t if t[-1] in ".!?" else t + "."


def arctic_prompts(cathy_dir: Path) -> list[str]:
    """The CMU ARCTIC prompts read by cathy (``*.txt`` beside each recording), sorted by file name."""
    return [p.read_text(encoding="utf-8").strip() for p in sorted(cathy_dir.glob("*.txt"))]


def wordnet_examples(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """The quoted example sentences of WordNet's ``data.*`` files, in file order."""
    out: list[str] = []
    for path in sorted(wordnet_dir.glob("data.*")):
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.startswith(" "):  # the licence header lines start with spaces
                out.extend(re.findall(r'"([^"]+)"', line.partition("|")[2]))
    return out


def wordnet_glosses(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """The definitions of WordNet's ``data.*`` synsets (the gloss before its quoted examples, split at ";"),
    in file order."""
    out: list[str] = []
    for path in sorted(wordnet_dir.glob("data.*")):
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.startswith(" "):  # the licence header lines start with spaces
                gloss = line.partition("|")[2].split('"')[0]
                out.extend(d.strip() for d in gloss.split(";") if d.strip())
    return out


def fortunes(fortunes_dir: Path = FORTUNES_DIR, files: Iterable[str] = FORTUNE_FILES) -> list[str]:
    """The fortunes of ``files`` without their "-- author" attribution lines, one string per fortune."""
    out: list[str] = []
    for name in files:
        path = fortunes_dir / name
        if not path.is_file():
            continue
        for block in path.read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln for ln in block.splitlines() if not ln.strip().startswith("--")]
            if not any(ln[:1].isspace() for ln in lines):  # indented lines: verse, dialogue, code
                out.append(" ".join(lines))
    return out


def read_source(name: str, cathy_dir: Path | None) -> list[str]:
    """The raw texts of one source; an absent source gives [] with a warning."""
    if name not in SOURCES:
        raise ValueError(f"unknown sentence source {name!r}; expected one of {SOURCES}")
    if name == "arctic":
        if cathy_dir is None or not cathy_dir.is_dir():
            logger.warning("ARCTIC prompts not found (cathy transcripts at %s); source skipped", cathy_dir)
            return []
        return arctic_prompts(cathy_dir)
    wordnet = name.startswith("wordnet")
    root = WORDNET_DIR if wordnet else FORTUNES_DIR
    if not root.is_dir():
        logger.warning("%s not found at %s (Debian package %s); source skipped", name, root,
                       "wordnet-base" if wordnet else "fortunes")
        return []
    if name == "wordnet_glosses":
        return wordnet_glosses(root)
    return wordnet_examples(root) if wordnet else fortunes(root)


def pool(texts: Iterable[str], source: str, seen: set[str], min_chars: int = MIN_CHARS,
         max_chars: int = MAX_CHARS) -> Iterator[Sentence]:
    """Clean ``texts`` and yield those whose split key is not in ``seen`` (which is updated)."""
    for raw in texts:
        text = clean(raw, min_chars, max_chars)
        if text is None:
            continue
        key = split_key(text)
        if key in seen:
            continue
        seen.add(key)
        digest = _digest_key(key)
        yield Sentence("s" + digest[:10], text, source, _heldout_digest(digest))


def _rank(seed: int, s: Sentence) -> str:
    # A per-seed order that does not depend on the pool: a grown pool keeps the earlier picks' ranks.
    return hashlib.sha1(f"{seed}:{s.id}".encode()).hexdigest()


def select(pools: dict[str, list[Sentence]], n: int, seed: int) -> list[Sentence]:
    """``n`` sentences, taken round-robin over the pools in their given order, each pool in seeded hash order.

    A pool that runs out leaves its turns to the others. Raises ValueError when fewer than ``n`` exist.
    """
    total = sum(len(p) for p in pools.values())
    if n > total:
        raise ValueError(f"asked for {n} sentences but the sources {list(pools)} hold only {total} usable ones")
    queues = [sorted(p, key=lambda s: _rank(seed, s)) for p in pools.values()]
    out: list[Sentence] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out


def load_sentences(n: int, seed: int, sources: Iterable[str] = DEFAULT_SOURCES, cathy_dir: Path | None = None,
                   min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[Sentence]:
    """``n`` cleaned, deduplicated sentences from ``sources`` (earlier sources win duplicates)."""
    seen: set[str] = set()
    pools = {name: list(pool(read_source(name, cathy_dir), name, seen, min_chars, max_chars)) for name in sources}
    for name, p in pools.items():
        logger.info("sentence source %s: %d usable (%d held out)", name, len(p), sum(s.heldout for s in p))
    return select(pools, n, seed)
