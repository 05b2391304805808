"""docs/: the API reference names every public name, the design page stands on its own, the examples run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import repforget_kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))


def test_api_reference_has_a_section_for_every_public_name():
    headings = set(re.findall(r"^### `(?:[\w.]+\.)?(\w+)`", (DOCS / "api.md").read_text(), re.M))
    missing = [name for name in repforget_kernels.__all__ if name not in headings]
    assert not missing, f"docs/api.md lacks a '### `name`' section for {missing}"
    assert "RepresentationCallback" in headings


def test_design_page_is_self_contained():
    text = (DOCS / "design.md").read_text()
    assert "DESIGN.md" not in text and "../shared" not in text
    for heading in ("## Layout", "## Backends and the dispatcher", "## Definitions", "## Pitfalls"):
        assert heading in text
    for link in re.findall(r"\]\(([^)#]+)", text):  # relative links point at files that exist
        assert (DOCS / link).exists(), link


def test_three_examples():
    assert [p.name for p in EXAMPLES] == ["numpy_arrays.py", "trainer_callback.py", "training_loop_monitor.py"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
