"""Fixtures shared by the sandbox tests."""

import os
import tempfile

import pytest


@pytest.fixture
def outside():
    """A world-readable, world-writable directory outside any sandbox with a world-readable secret.txt in it
    (so only the sandbox's own layers, not the directory's permissions, can keep the sandbox out)."""
    with tempfile.TemporaryDirectory(prefix="k25-escape-") as d:
        os.chmod(d, 0o777)
        secret = os.path.join(d, "secret.txt")
        with open(secret, "w") as f:
            f.write("TOP-SECRET")
        os.chmod(secret, 0o666)
        yield d
