"""Published safety benchmarks from `inspect_evals`, run when their data can be fetched.

StrongREJECT, XSTest, AgentHarm, CyberSecEval 2 and BBQ download their data sets when the task is built (the
Hugging Face Hub or GitHub). Without a network that download retries for minutes and ends in an exception
deep in `datasets`; here a short connection probe comes first, and either failure becomes one clear
`ExternalUnavailable` line that the report prints and records, while the shipped probe sets cover the same
dimensions offline.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable

from inspect_ai import Task

# name -> (module, task function, host its data comes from, the shipped probe set covering the same dimension)
EXTERNAL: dict[str, tuple[str, str, str, str]] = {
    "strong_reject": ("inspect_evals.strong_reject", "strong_reject", "raw.githubusercontent.com", "cbrne/cyber"),
    "xstest": ("inspect_evals.xstest", "xstest", "huggingface.co", "over_refusal"),
    "agentharm": ("inspect_evals.agentharm", "agentharm", "huggingface.co", "agentic_alignment"),
    "cyberseceval_2": ("inspect_evals.cyberseceval_2", "cyse2_interpreter_abuse", "raw.githubusercontent.com",
                       "cyber_offence"),
    "bbq": ("inspect_evals.bbq", "bbq", "huggingface.co", "social_bias"),
}


class ExternalUnavailable(RuntimeError):
    """An inspect_evals task could not be built here; the message says which, why, and what covers it."""


def reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> str | None:
    """None when a TCP connection to host:port opens within `timeout_s`, else the reason it did not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def load_external(name: str, *, probe: Callable[[str], str | None] = reachable, **task_args) -> Task:
    """The inspect_evals task `name`, or ExternalUnavailable naming the missing package, host or data."""
    if name not in EXTERNAL:
        raise KeyError(f"unknown external safety task {name!r}; known: {sorted(EXTERNAL)}")
    module, fn, host, covered_by = EXTERNAL[name]
    tail = f"The shipped '{covered_by}' probes cover this dimension offline."
    try:
        task_fn = getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise ExternalUnavailable(f"{name}: inspect_evals is not installed ({e}); pip install inspect-evals. "
                                  f"{tail}") from e
    why = probe(host)
    if why is not None:
        raise ExternalUnavailable(f"{name}: its data set could not be fetched: {host} is unreachable ({why}). "
                                  f"{tail}")
    try:
        return task_fn(**task_args)
    except Exception as e:  # noqa: BLE001 - datasets/requests raise many types; one clear line for each
        raise ExternalUnavailable(f"{name}: its data set could not be fetched from {host} "
                                  f"({type(e).__name__}: {str(e)[:300]}). {tail}") from e
