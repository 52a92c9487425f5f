"""The report as a readable table: one line per test set, task and row (model, ground truth)."""

from __future__ import annotations

from typing import Any

COLUMNS = (  # (header, key in a row summary, format)
    ("WER%", "wer", "pct"), ("CER%", "cer", "pct"), ("sim", "similarity", "f3"),
    ("sim-tgt", "similarity_target", "f3"), ("sim-src", "similarity_source", "f3"),
    ("transfer", "transfer", "f3"), ("OVRL", "dnsmos.ovrl", "f2"), ("SIG", "dnsmos.sig", "f2"),
    ("BAK", "dnsmos.bak", "f2"), ("P808", "dnsmos.p808", "f2"), ("RTF", "rtf", "f3"),
)
ROWS = (("model", "model"), ("ground_truth", "ground truth"))


def _get(row: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if kind == "pct" else f"{value:.{kind[1]}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report's figures as an aligned text table (``-``: not measured for that row or task)."""
    header = ["test set", "task", "row", "n", *(c[0] for c in COLUMNS)]
    lines = [header]
    for name, test_set in report["test_sets"].items():
        for task in ("asr", "tts", "vc"):
            if task not in test_set:
                continue
            for key, label in ROWS:
                if key in test_set[task]:
                    row = test_set[task][key]
                    lines.append([name, task, label, str(test_set[task]["count"]),
                                  *(_fmt(_get(row, k), f) for _, k, f in COLUMNS)])
    # Columns no row fills are left out (an ASR-only report has no similarity columns).
    keep = [i for i in range(len(header)) if i < 4 or any(line[i] != "-" for line in lines[1:])]
    widths = [max(len(line[i]) for line in lines) for i in keep]

    def cells(line: list[str]) -> str:
        return "  ".join(line[i].ljust(w) if i < 3 else line[i].rjust(w)
                         for i, w in zip(keep, widths, strict=True)).rstrip()

    return "\n".join(cells(line) for line in lines)
