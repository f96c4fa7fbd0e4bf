"""scripts/setup_venv.sh: idempotent, and a .venv copied from another checkout is re-pointed.

The venv here is a directory whose ``bin/python`` records its arguments instead of running
pip (a real install needs the network and minutes); what is under test is the script's own
logic: when it installs, what its stamp holds, and how it repairs a copied venv.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDING_PYTHON = '#!/bin/sh\necho "$*" >> "$(dirname "$0")/../calls.log"\n'


def _checkout(base: Path) -> Path:
    """A checkout with the set-up inputs and a venv whose python records pip calls."""
    (base / "scripts").mkdir(parents=True)
    for name in ("setup.cfg", "pyproject.toml", "scripts/setup_venv.sh"):
        shutil.copy(ROOT / name, base / name)
    bin_dir = base / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(RECORDING_PYTHON)
    (bin_dir / "python").chmod(0o755)
    venv = base / ".venv"
    (bin_dir / "pytest").write_text(f"#!{venv}/bin/python\nimport sys\n")
    (bin_dir / "activate").write_text(f"VIRTUAL_ENV='{venv}'\nexport VIRTUAL_ENV\n")
    return base


def _set_up(checkout: Path) -> list[str]:
    """Runs the checkout's script; returns the pip calls it made."""
    log = checkout / ".venv/calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    done = subprocess.run(
        ["bash", str(checkout / "scripts/setup_venv.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    after = log.read_text().splitlines() if log.exists() else []
    return after[len(before) :]


def test_set_up_runs_once_and_stamps_the_checkout(tmp_path):
    first = _checkout(tmp_path / "first")
    calls = _set_up(first)
    assert any("install torch==2.13.0" in call for call in calls), calls
    assert any(f"install -e {first}[dev]" in call for call in calls), calls
    assert str(first) in (first / ".venv/.fipo-setup-stamp").read_text()
    assert _set_up(first) == []  # nothing changed: nothing to do


def test_a_venv_copied_from_another_checkout_is_re_pointed(tmp_path):
    first = _checkout(tmp_path / "first")
    _set_up(first)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, symlinks=True)
    calls = _set_up(copy)
    assert any(f"install -e {copy}[dev]" in call for call in calls), calls
    assert (copy / ".venv/bin/pytest").read_text().startswith(f"#!{copy}/.venv/bin/python\n")
    assert (copy / ".venv/bin/activate").read_text().startswith(f"VIRTUAL_ENV='{copy}/.venv'")
    assert str(first) not in (copy / ".venv/bin/activate").read_text()
    assert str(copy) in (copy / ".venv/.fipo-setup-stamp").read_text()
    assert _set_up(copy) == []
    # The original is untouched.
    assert (first / ".venv/bin/pytest").read_text().startswith(f"#!{first}/.venv/bin/python\n")
