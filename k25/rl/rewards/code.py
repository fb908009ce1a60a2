"""Code reward: the task's tests run against the model's program inside the sandboxed Python tool.

Model-written code never runs in this process: every execution goes through `k25.tools.python`'s sandbox
(imported lazily, so the other rewards do not need it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced code block (```python ... ```) of a response, or the whole response if it has none."""
    blocks = _FENCE.findall(response)
    return (blocks[-1] if blocks else response).strip()


def code_tests(program: str, tests: Sequence[str], *, sandbox: Any = None, all_or_nothing: bool = False) -> float:
    """r = (tests that run without error) / len(tests); 0 if the program itself fails.

    Each test is a snippet of Python (typically asserts) run in the sandbox as its own cell `program + test`:
    the session persists, but re-running the program before every test re-establishes its definitions, so a
    failing test or one that rebinds a name does not decide the next one. A program that times out, crashes
    or exhausts the sandbox's limits scores 0 (the sandbox reports it as an error; it never raises here).
    `all_or_nothing=True` gives 1 only when every test passes (the usual "passes the hidden tests" outcome).
    `sandbox` is anything with `run(code) -> result` whose result has `.error` (None on success); by default
    a fresh `k25.tools.python.PythonSandbox()`, closed afterwards.
    """
    if isinstance(tests, str) or not tests:
        raise ValueError("code_tests: tests must be a non-empty list of test snippets (strings)")
    if sandbox is None:
        from k25.tools.python import PythonSandbox

        with PythonSandbox() as fresh:
            return code_tests(program, tests, sandbox=fresh, all_or_nothing=all_or_nothing)
    if sandbox.run(program).error is not None:
        return 0.0
    passed = sum(sandbox.run(program + "\n\n" + test).error is None for test in tests)
    if all_or_nothing:
        return float(passed == len(tests))
    return passed / len(tests)
