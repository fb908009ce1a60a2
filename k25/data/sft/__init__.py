"""SFT data: conversation records (JSONL), and generated sources of tool-use trajectories run in the sandbox.

`generate(source, n, seed)` runs `n` plans of a source (`zero_vision`: text-only Python-over-text
trajectories; `text_vision`: image trajectories with crop/rotate/flip steps) in one PythonSandbox session and
returns the records; `swarm_orchestrator[_compact]` (k25.swarm.trajectories) runs the scripted Agent Swarm orchestrator
on training tasks instead (no sandbox). `python -m k25.data.sft.generate` writes them to a JSONL file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from k25.data.sft import text_vision, zero_vision
from k25.data.sft.records import Record
from k25.data.sft.trajectory import Plan, run_plan

SOURCES: dict[str, dict[str, Callable[[np.random.Generator], Plan]]] = {
    "zero_vision": zero_vision.KINDS, "text_vision": text_vision.KINDS}
# sources that run episodes, not sandbox plans: source -> the orchestrator prompt variant (k25.swarm.prompts)
EPISODE_SOURCES = {"swarm_orchestrator": "appendix_e", "swarm_orchestrator_compact": "compact"}


def _episode_records(source: str, n: int, seed: int) -> list[Record]:
    from k25.swarm.trajectories import orchestrator_records

    return orchestrator_records(n, seed, prompt=EPISODE_SOURCES[source])


def plans(source: str, n: int, seed: int) -> list[Plan]:
    """`n` plans of `source`, cycling through its kinds (kind i of example k: k mod kinds)."""
    if source not in SOURCES:
        raise ValueError(f"unknown SFT source {source!r}; choose from {sorted([*SOURCES, *EPISODE_SOURCES])}")
    kinds = sorted(SOURCES[source])
    return [SOURCES[source][kinds[k % len(kinds)]](np.random.default_rng([seed, 104729, k])) for k in range(n)]


def generate(source: str, n: int, seed: int = 0, *, timeout_s: float = 20.0) -> list[Record]:
    """`n` records of `source`, every tool call executed in one sandboxed Python session (or, for an episode
    source, in its own offline environment)."""
    if source in EPISODE_SOURCES:
        return _episode_records(source, n, seed)
    from k25.tools.python import PythonSandbox

    with PythonSandbox(timeout_s=timeout_s, memory_mb=768) as sandbox:
        return [run_plan(sandbox, p) for p in plans(source, n, seed)]
