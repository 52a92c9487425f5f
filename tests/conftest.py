"""Shared fixtures: the golden fixture set (GPA_FIXTURES, default ../shared/fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    """The fixture directory: $GPA_FIXTURES or ../shared/fixtures beside the repository."""
    root = Path(os.environ.get("GPA_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not (root / "golden" / "expected.json").is_file():
        raise FileNotFoundError(f"golden fixtures not found under {root}; set GPA_FIXTURES")
    return root


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_root()


@pytest.fixture(scope="session")
def mini_dir(fixtures: Path) -> Path:
    """The tiny GPA checkpoint directory in the official layout."""
    return fixtures / "gpa-mini"


@pytest.fixture(scope="session")
def expected(fixtures: Path) -> dict:
    """golden/expected.json: input files, offsets, special ids, prompt keys."""
    return json.loads((fixtures / "golden" / "expected.json").read_text())


@pytest.fixture(scope="session")
def golden(fixtures: Path) -> dict[str, torch.Tensor]:
    """golden/expected.safetensors: the reference implementation's outputs."""
    return load_file(str(fixtures / "golden" / "expected.safetensors"))


@pytest.fixture(scope="session")
def golden_inputs(fixtures: Path, expected: dict) -> dict[str, Path]:
    """Golden input name -> audio file path."""
    return {name: fixtures / "golden" / info["path"] for name, info in expected["files"].items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against reference b."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def official_dir(fixtures: Path) -> Path:
    """A random-weight checkpoint with every official file, name and shape (about 4.3 GB).

    Taken from $GPA_OFFICIAL_DIR when set, else built once by the fixtures' make_official_shaped.py
    into $XDG_CACHE_HOME/gpa/tests/official-shaped and reused by later runs.
    """
    if os.environ.get("GPA_OFFICIAL_DIR"):
        return Path(os.environ["GPA_OFFICIAL_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpa" / "tests" / "official-shaped"
    marker = cache / ".complete"
    if not marker.exists():
        tool = fixtures.parent / "tools" / "make_official_shaped.py"
        subprocess.run([sys.executable, str(tool), str(cache), str(fixtures)], check=True)
        marker.touch()
    return cache
