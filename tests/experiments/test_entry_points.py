"""The absl entry points share one process-wide FLAGS (a test worker imports several of them): none may leave
a validator there (a required flag) that fails another entry point's parsing. Each is checked in a fresh
interpreter, as some of them define flags of the same name and never share a process outside the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = """
import importlib, sys
from absl import flags
importlib.import_module("experiments." + sys.argv[1])
flags.FLAGS(["prog"])  # runs every validator the module registered
"""


@pytest.mark.parametrize("name", ["ablate", "convert", "long_context", "run", "serve", "swarm_run"])
def test_entry_point_leaves_no_validator(name):
    proc = subprocess.run([sys.executable, "-c", CHECK, name], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
