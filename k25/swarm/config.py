"""Swarm configuration: step limits per benchmark (Appendix E) and context management."""

from __future__ import annotations

import dataclasses

# (orchestrator, each subagent) step limits from Appendix E "Agent Swarm Configuration / Step Limits".
BENCHMARK_STEP_LIMITS: dict[str, tuple[int, int]] = {
    "browsecomp": (15, 100),
    "widesearch": (100, 100),
    "inhouse": (100, 50),
}

CONTEXT_MODES = ("none", "discard_all")


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
    """How an episode runs.

    A step is one model turn (one call of the policy; the turn's tool calls then run concurrently): steps
    are the unit of latency that critical steps add up. `single_max_steps` bounds the single-agent baseline.
    `context="discard_all"` (the DeepSeek-V3.2 strategy Appendix E uses for BrowseComp): once an agent's
    context passes `context_max_tokens`, everything after its system prompt and task is dropped and it goes
    on from there; the step count is not reset.
    `max_critical_steps` budgets the episode in critical steps (§3: training and evaluation are constrained
    by critical steps, not total steps): the orchestrator stops once the budget is spent, and a subagent
    launched with B critical steps left gets at most B - 2 steps (one for the turn that launches it, one kept
    for the orchestrator's answer); with none left, `assign_task` answers an error instead of running it.
    """

    main_max_steps: int = 100
    sub_max_steps: int = 100
    single_max_steps: int = 100
    context: str = "none"
    context_max_tokens: int = 200_000
    sub_timeout_s: float = 600.0  # wall time of one subagent run; past it the task is reported as failed
    episode_timeout_s: float = 3600.0
    max_subagents: int = 100  # create_subagent calls (agent configurations) allowed per episode
    max_assignments: int = 1000  # assign_task runs allowed per episode (a bound on spurious parallelism's cost)
    max_concurrent_subagents: int = 64  # subagents running at once; more calls in a turn wait for a slot
    max_critical_steps: int | None = None  # the episode's critical-step budget (None: only the step limits)
    temperature: float = 1.0  # Appendix E's protocol: temperature 1.0, top-p 0.95
    top_p: float = 0.95
    max_tokens: int = 4096  # completion tokens per turn

    def __post_init__(self):
        for name in ("main_max_steps", "sub_max_steps", "single_max_steps", "context_max_tokens", "max_subagents",
                     "max_assignments", "max_concurrent_subagents", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SwarmConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"SwarmConfig.context must be one of {CONTEXT_MODES}, got {self.context!r}")
        if self.max_critical_steps is not None and self.max_critical_steps < 1:
            raise ValueError(f"SwarmConfig.max_critical_steps must be >= 1 or None, got {self.max_critical_steps}")
        if self.sub_timeout_s <= 0 or self.episode_timeout_s <= 0:
            raise ValueError("SwarmConfig.sub_timeout_s and episode_timeout_s must be > 0")

    @classmethod
    def for_benchmark(cls, name: str, **overrides) -> SwarmConfig:
        """The Appendix E step limits of `name` (browsecomp | widesearch | inhouse), plus any overrides."""
        if name not in BENCHMARK_STEP_LIMITS:
            raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARK_STEP_LIMITS)}")
        main, sub = BENCHMARK_STEP_LIMITS[name]
        fields = dict(main_max_steps=main, sub_max_steps=sub, single_max_steps=max(main, sub))
        fields.update(overrides)
        return cls(**fields)
