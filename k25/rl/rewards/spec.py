"""Per-task reward specs: which rule-based rewards and which GRM rubric score a task, and how they combine.

A spec maps reward names to weights, e.g. `{"math_answer": 1.0}` for a verifiable task, `{"grm": 1.0}` for an
open-ended one, or `{"exact_match": 0.7, "grm": 0.3}` with `gate="exact_match"` for the report's "GRMs on top
of verified reward signals". The reward is the weighted mean of the terms,

    r = sum_i w_i s_i / sum_i w_i,    and r = 0 if s_gate < gate_threshold,

each s_i in [0, 1]. A failed gate skips the judge call. Rule terms read the response text through the parsers
in `k25.rl.rewards.parse` and compare with the task's target; they run in a worker thread so a slow check
(sympy, the sandbox) does not stall the rollout event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from k25.rl.rewards.answers import counting_score, exact_match, math_answer, ocr_score
from k25.rl.rewards.code import code_tests, extract_code
from k25.rl.rewards.geometry import grounding_f1, point_f1, polygon_iou
from k25.rl.rewards.grm import GRMJudge
from k25.rl.rewards.parse import final_answer, parse_boxes, parse_number, parse_points, parse_polygon
from k25.rl.rewards.safety import refusal_match

RuleFn = Callable[..., float]

# name -> fn(response_text, target, **kwargs): the parser and the reward, composed
RULES: dict[str, RuleFn] = {
    "exact_match": lambda resp, target, **kw: exact_match(final_answer(resp), target, **kw),
    "math_answer": lambda resp, target: math_answer(resp, target),
    "code_tests": lambda resp, target, **kw: code_tests(extract_code(resp), target, **kw),
    "grounding_f1": lambda resp, target, **kw: grounding_f1(parse_boxes(resp), target, **kw),
    "point_f1": lambda resp, target, **kw: point_f1(parse_points(resp), target, **kw),
    "polygon_iou": lambda resp, target, **kw: polygon_iou(parse_polygon(resp), target, **kw),
    "ocr_score": lambda resp, target: ocr_score(final_answer(resp), target),
    "counting_score": lambda resp, target: counting_score(parse_number(resp), target),
    "refusal_match": lambda resp, target: refusal_match(resp, target),
}
GRM = "grm"


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """weights: reward name (a key of RULES, or "grm") -> weight > 0. kwargs: per-name keyword arguments
    (e.g. {"point_f1": {"sigma": 8.0}}). rubric: the GRM's rubric (required with "grm"). gate / gate_threshold:
    a term that must score at least the threshold for the reward to count."""

    weights: Mapping[str, float]
    kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    rubric: str | None = None
    gate: str | None = None
    gate_threshold: float = 1.0

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("RewardSpec.weights is empty; name at least one reward, e.g. {'exact_match': 1.0}")
        for name, w in self.weights.items():
            if name != GRM and name not in RULES:
                raise ValueError(f"RewardSpec.weights: unknown reward {name!r}; known: {sorted(RULES)} and 'grm'")
            if not w > 0:
                raise ValueError(f"RewardSpec.weights[{name!r}]={w}: weights must be > 0 (drop the term instead)")
        for name in self.kwargs:
            if name not in self.weights or name == GRM:
                raise ValueError(f"RewardSpec.kwargs names {name!r}, which is not a weighted rule term (the "
                                 "judge is configured on GRMJudge)")
        if GRM in self.weights and not self.rubric:
            raise ValueError("RewardSpec: 'grm' is weighted but rubric is empty; give the GRM's rubric")
        if self.gate is not None and self.gate not in self.weights:
            raise ValueError(f"RewardSpec.gate={self.gate!r} is not one of the weighted terms {list(self.weights)}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> RewardSpec:
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"reward spec: unknown field(s) {unknown}")
        return cls(**cfg)


@dataclasses.dataclass
class RewardResult:
    reward: float
    components: dict[str, float]  # each term's score in [0, 1] (a gated-off judge is absent)
    gated: bool = False  # True when the gate term fell short and the reward was set to 0
    judge_failed: bool = False  # the judge's fallback stood in for its score


async def compute_reward(spec: RewardSpec, response: str, target: Any = None, *, prompt: str = "",
                         judge: GRMJudge | None = None, reference: str | None = None,
                         rule_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> RewardResult:
    """Score one response under `spec` (see the module docstring). `target` feeds the rule terms; `prompt`
    and `reference` the judge; `rule_kwargs` adds per-call keyword arguments to rule terms (e.g. the
    episode's own sandbox: {"code_tests": {"sandbox": sb}})."""
    extra = dict(rule_kwargs or {})
    stray = sorted(set(extra) - set(spec.weights) | ({GRM} & set(extra)))
    if stray:
        raise ValueError(f"compute_reward: rule_kwargs names {stray}, which are not weighted rule terms")
    components: dict[str, float] = {}
    for name in spec.weights:
        if name != GRM:
            kw = {**spec.kwargs.get(name, {}), **extra.get(name, {})}
            components[name] = float(await asyncio.to_thread(RULES[name], response, target, **kw))
    gated = spec.gate is not None and spec.gate != GRM and components[spec.gate] < spec.gate_threshold
    failed = False
    if GRM in spec.weights and not gated:
        if judge is None:
            raise ValueError("compute_reward: the spec weights 'grm' but no judge was given")
        j = await judge.judge(prompt, response, rubric=spec.rubric, reference=reference)
        components[GRM], failed = j.score, j.failed
        gated = spec.gate == GRM and j.score < spec.gate_threshold
    if gated:
        return RewardResult(0.0, components, gated=True, judge_failed=failed)
    total = sum(spec.weights[n] * s for n, s in components.items()) / sum(spec.weights.values())
    return RewardResult(total, components, judge_failed=failed)
