"""The playground's JavaScript protocol codec against the conformance vectors, with node's own
test runner (tests/js/). Node comes from Debian packages (scripts/bootstrap.sh, dev extra)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def test_javascript_codec_passes_the_conformance_vectors():
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node on PATH: scripts/bootstrap.sh dev installs Debian's nodejs")
    proc = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", proc.stdout, re.M)
    assert "# fail 0" in proc.stdout and passed and int(passed.group(1)) >= 5, proc.stdout[-2000:]
