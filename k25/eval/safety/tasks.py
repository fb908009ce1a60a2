"""The safety suite: one inspect task per dimension of the independent K2.5 safety evaluation.

    inspect eval k25/cbrne_uplift --model k25/RUN_DIR
    inspect eval k25/over_refusal --model openai/NAME -T judge=openai/JUDGE   # OPENAI_BASE_URL, JUDGE_BASE_URL

`judge` is an inspect-style model name (`openai/NAME` or `k25/PATH`) or a ready `SafetyJudge`; without one the
rule-based scorer decides. Every task runs unchanged against `k25/...` and `openai/...` models.
"""

from __future__ import annotations

from inspect_ai import Task, task
from inspect_ai.model import GenerateConfig
from inspect_ai.solver import generate

from k25.eval.safety.agentic import agentic_probe
from k25.eval.safety.cyber import cyber_probe
from k25.eval.safety.probes import dataset
from k25.eval.safety.scorer import SafetyJudge, safety_scorer
from k25.rl.rewards.grm import judge_client

MAX_TOKENS = 512  # enough to see whether a reply refuses or complies; the probes need no long answers


def _judge(judge: str | SafetyJudge | None) -> SafetyJudge | None:
    if judge is None or isinstance(judge, SafetyJudge):
        return judge
    return SafetyJudge(judge_client(judge))


def _task(files: tuple[str, ...], judge, *, solver=None, max_tokens: int = MAX_TOKENS) -> Task:
    return Task(dataset=dataset(*files), solver=solver or generate(), scorer=safety_scorer(_judge(judge)),
                config=GenerateConfig(max_tokens=max_tokens))


@task
def cbrne_uplift(judge: str | None = None) -> Task:
    """Refusal of chemical, biological, radiological, nuclear and explosives weapon requests."""
    return _task(("cbrne",), judge)


@task
def cyber_offence(judge: str | None = None) -> Task:
    """Refusal of offensive cyber requests (malware, intrusion, credential theft, infrastructure attacks)."""
    return _task(("cyber",), judge)


@task
def cyber_capability(max_turns: int = 6) -> Task:
    """Capture-the-flag probes solved with the sandboxed Python tool: `solve_rate` (and refusal)."""
    return _task(("cyber_capability",), None, solver=cyber_probe(max_turns), max_tokens=1024)


@task
def harmful_compliance(judge: str | None = None) -> Task:
    """Refusal of disinformation and verbatim-copyright requests (categories `disinformation`, `copyright`)."""
    return _task(("harmful_compliance",), judge)


@task
def agentic_alignment(max_turns: int = 8) -> Task:
    """Sabotage and self-replication opportunities in a simulated tool environment (refusal = not taken)."""
    return _task(("agentic",), None, solver=agentic_probe(max_turns))


@task
def censorship_bias(judge: str | None = None) -> Task:
    """Censorship (factual questions on sensitive topics) and political bias (paired requests about two
    sides), each in English and Chinese: categories `censorship_en/_zh`, `political_bias_en/_zh`."""
    return _task(("censorship", "political_bias"), judge)


@task
def social_bias(judge: str | None = None) -> Task:
    """BBQ-style multiple choice: bias is picking the stereotyped person where the context does not say."""
    return _task(("social_bias",), judge, max_tokens=128)


@task
def sycophancy_delusion(judge: str | None = None) -> Task:
    """Pushback against false claims (`sycophancy`) and against users' delusions (`delusion`)."""
    return _task(("sycophancy", "delusion"), judge)


@task
def over_refusal(judge: str | None = None) -> Task:
    """XSTest-style benign prompts that look harmful; refusal here is over-refusal."""
    return _task(("over_refusal",), judge)


SAFETY_TASKS = {"cbrne_uplift": cbrne_uplift, "cyber_offence": cyber_offence, "cyber_capability": cyber_capability,
                "harmful_compliance": harmful_compliance,
                "agentic_alignment": agentic_alignment, "censorship_bias": censorship_bias,
                "social_bias": social_bias, "sycophancy_delusion": sycophancy_delusion, "over_refusal": over_refusal}
