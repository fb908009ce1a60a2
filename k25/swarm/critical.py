"""Critical steps: the latency measure of a parallel-agent episode (report §3).

An episode is a sequence of stages; in each the orchestrator takes an action (a direct tool call, or a
group of subagents launched together) and the stage lasts as long as its slowest subagent, like the
critical path of a computation graph:

    CriticalSteps = sum_t ( S_main^(t) + max_i S_sub,i^(t) )

A stage without subagents contributes only S_main^(t).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative int, got {value!r}")
    return value


def critical_steps(stages: Sequence[Mapping]) -> int:
    """Sum over stages of `main_steps + max(sub_steps)` (0 for an empty `sub_steps`).

    `stages` is `[{"main_steps": int, "sub_steps": [int, ...]}, ...]`, one `sub_steps` entry per subagent
    run in that stage (the shape `EpisodeTrace.stages` has).
    """
    total = 0
    for t, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or "main_steps" not in stage or "sub_steps" not in stage:
            raise ValueError(f"stages[{t}] must be a dict with 'main_steps' (int) and 'sub_steps' (list of int), "
                             f"got {stage!r}")
        main = _count(stage["main_steps"], f"stages[{t}]['main_steps']")
        subs = stage["sub_steps"]
        if isinstance(subs, (str, bytes)) or not isinstance(subs, Sequence):
            raise ValueError(f"stages[{t}]['sub_steps'] must be a list of ints (one per subagent), got {subs!r}")
        subs = [_count(s, f"stages[{t}]['sub_steps'][{i}]") for i, s in enumerate(subs)]
        total += main + max(subs, default=0)
    return total
