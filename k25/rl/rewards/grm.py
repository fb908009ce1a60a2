"""The Generative Reward Model: a model that grades a response against a rubric.

The judge prompts any `k25.infer.client.ChatClient` (a k25 checkpoint in-process, the k25 server or any
OpenAI-compatible endpoint), reads the last `Score: N` (or JSON `"score": N`) of its reply and returns
N rescaled to [0, 1]. A reply without a score in range is answered with a correction asking for the score
line only; a failing backend is retried with the same request. After `max_retries` extra attempts the judge
raises `JudgeError` carrying the last reply, or, if `fallback` is set, returns that score marked `failed`.
Several rubrics (the report's per-context GRM rubrics) are just several judges or a `rubric=` per call.
"""

from __future__ import annotations

import dataclasses
import os
import re

from k25.infer.client import ChatClient, ClientError, OpenAIClient

DEFAULT_TEMPLATE = """You are a strict, fair grader. Grade the RESPONSE to the PROMPT against the RUBRIC.

RUBRIC:
{rubric}

PROMPT:
{prompt}
{reference_block}
RESPONSE:
{response}

Explain your grading in a few sentences, then end with a final line of exactly the form `Score: N`, where N is \
a number from {lo} to {hi} ({hi} = fully meets the rubric)."""

_SCORE = re.compile(r"[\"']?\bscore\b[\"']?\s*[:=]\s*\**\s*([-+]?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?",
                    re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge produced no valid score after all retries (the message holds its last reply)."""


@dataclasses.dataclass
class Judgment:
    score: float  # rescaled to [0, 1]
    raw_score: float | None  # on the judge's scale [lo, hi]
    text: str  # the judge's last reply
    attempts: int  # chat calls made
    failed: bool = False  # True only when `fallback` stood in for a score


def parse_score(text: str, lo: float, hi: float) -> float | None:
    """The last `score: N` (or `Score: N/hi`) in `text` if it lies in [lo, hi], else None."""
    found = _SCORE.findall(text or "")
    if not found:
        return None
    value, denom = found[-1]
    v = float(value)
    if denom and float(denom) != hi:
        return None  # graded on another scale than asked: malformed
    return v if lo <= v <= hi else None


class GRMJudge:
    """Scores (prompt, response) pairs against a rubric with a model behind `client`."""

    def __init__(self, client: ChatClient, *, rubric: str | None = None, score_range: tuple[float, float] = (0, 10),
                 max_retries: int = 2, temperature: float = 0.0, max_tokens: int = 512,
                 template: str = DEFAULT_TEMPLATE, fallback: float | None = None,
                 chat_kwargs: dict | None = None) -> None:
        lo, hi = score_range
        if not lo < hi:
            raise ValueError(f"score_range={score_range}: need lo < hi")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries}: must be >= 0")
        if fallback is not None and not 0.0 <= fallback <= 1.0:
            raise ValueError(f"fallback={fallback}: must be None (raise) or a score in [0, 1]")
        for key in ("{rubric}", "{prompt}", "{response}"):
            if key not in template:
                raise ValueError(f"template lacks the {key} field")
        self.client, self.rubric, self.lo, self.hi = client, rubric, float(lo), float(hi)
        self.max_retries, self.temperature, self.max_tokens = max_retries, temperature, max_tokens
        self.template, self.fallback = template, fallback
        self.chat_kwargs = dict(chat_kwargs or {})  # e.g. {"chat_template_kwargs": {"thinking": False}}

    def messages(self, prompt: str, response: str, *, rubric: str | None = None,
                 reference: str | None = None) -> list[dict]:
        rubric = rubric if rubric is not None else self.rubric
        if not rubric:
            raise ValueError("GRMJudge: no rubric (give rubric= to the judge or to this call)")
        ref = f"\nREFERENCE ANSWER (for the grader only):\n{reference}\n" if reference else ""
        lo, hi = _fmt(self.lo), _fmt(self.hi)
        text = self.template.format(rubric=rubric, prompt=prompt, response=response, reference_block=ref,
                                    lo=lo, hi=hi)
        return [{"role": "user", "content": text}]

    async def judge(self, prompt: str, response: str, *, rubric: str | None = None,
                    reference: str | None = None) -> Judgment:
        """One grade in [0, 1]; see the module docstring for retries and failures."""
        messages = self.messages(prompt, response, rubric=rubric, reference=reference)
        last, problem = "", ""
        for attempt in range(1, self.max_retries + 2):
            try:
                result = await self.client.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                                **self.chat_kwargs)
            except ClientError as e:
                problem = f"backend error: {e}"
                continue
            last = result.content
            raw = parse_score(last, self.lo, self.hi)
            if raw is not None:
                return Judgment((raw - self.lo) / (self.hi - self.lo), raw, last, attempt)
            problem = "no `Score: N` line with N in range"
            messages = [*messages, {"role": "assistant", "content": last},
                        {"role": "user", "content": f"Your reply did not end with a valid score line. Reply with "
                                                    f"one line `Score: N`, N from {_fmt(self.lo)} to "
                                                    f"{_fmt(self.hi)}."}]
        attempts = self.max_retries + 1
        if self.fallback is not None:
            return Judgment(self.fallback, None, last, attempts, failed=True)
        raise JudgeError(f"GRM judge ({getattr(self.client, 'model', '?')}) gave no valid score in {attempts} "
                         f"attempt(s): {problem}; last reply: {last[-300:]!r}")


def judge_client(spec: str) -> ChatClient:
    """A ChatClient from an inspect-style model name: `openai/NAME` (base URL and key from JUDGE_BASE_URL /
    JUDGE_API_KEY, else OPENAI_BASE_URL / OPENAI_API_KEY) or `k25/PATH` (the in-process sampler)."""
    api, _, name = spec.partition("/")
    if api == "openai" and name:
        return OpenAIClient(name, base_url=os.environ.get("JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL"),
                            api_key=os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                            token_ids=False)
    if api == "k25" and name:
        from k25.eval.provider import K25ModelAPI

        return K25ModelAPI.load_client(name)
    raise ValueError(f"judge={spec!r}: use 'openai/NAME' or 'k25/PATH'.")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
