"""The LLM gateway: an OpenAI-compatible proxy in front of the sampler that records a third-party agent
loop's traffic as token trajectories, so black-box agent code can be trained too.

The gateway serves the k25 server's API (k25.serve.app, the same routes, validation and errors) under
`/sessions/{sid}/v1/...`: an agent gets `base_url=gateway_url + "/sessions/<sid>/v1"` and talks to it with any
OpenAI client. Every generation of a session is recorded as the sampler returned it: prompt ids, completion
ids, logprobs, finish reason (token-in-token-out; nothing is re-tokenised). `trajectories(sid)` then stitches
the calls: when a call's prompt starts with the previous call's prompt + completion (an agent loop that
appends tool results and asks again), the new prompt tokens are appended with loss mask 0 and the completion
with mask 1, giving one multi-turn trajectory; when it does not (the agent rewrote its history, or the chat
template renders an earlier turn differently from how it was sampled, e.g. dropped reasoning), a new
trajectory starts, so no token is ever trained on under a context the model did not see. `episodes(...)`
turns them into rollout `Episode`s with the agent's reward, ready for the trainer's batch.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import threading
from collections.abc import Sequence
from typing import Any

from k25.rl.rollout import Episode
from k25.serve.app import create_app
from k25.serve.engine import Choice, Engine

_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("k25_gateway_session", default=None)
_PATH = re.compile(r"^/sessions/(?P<sid>[A-Za-z0-9_.:-]{1,128})(?P<rest>/v1/.*)$")


@dataclasses.dataclass
class Call:
    """One recorded generation (one choice of one request)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclasses.dataclass
class Trajectory:
    prompt_ids: list[int]
    ids: list[int]  # everything after the prompt: completions (mask 1) and what the agent added (mask 0)
    logprobs: list[float]
    mask: list[int]
    calls: int


class _RecordingEngine(Engine):
    """The server's engine, recording each generation under the request's session."""

    def __init__(self, gateway: Gateway, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gateway = gateway

    async def generate(self, prompt_ids: list[int], **kwargs: Any) -> list[Choice]:
        choices = await super().generate(prompt_ids, **kwargs)
        sid = _SESSION.get()
        if sid is not None:
            self.gateway.record(sid, [Call(list(prompt_ids), list(c.token_ids), list(c.logprobs), c.finish_reason)
                                      for c in choices])
        return choices


class Gateway:
    """An ASGI application (serve `gateway.app` with uvicorn); sessions are created by their first request."""

    def __init__(self, sampler: Any, chat: Any, *, model_name: str = "k25", api_key: str | None = None,
                 max_calls_per_session: int = 10_000):
        self.engine = _RecordingEngine(self, sampler, chat, model_name=model_name)
        self.max_calls = max_calls_per_session
        self._inner = create_app(self.engine, api_key=api_key)
        self._calls: dict[str, list[Call]] = {}
        self._lock = threading.Lock()

    def record(self, sid: str, calls: Sequence[Call]) -> None:
        with self._lock:
            log = self._calls.setdefault(sid, [])
            if len(log) + len(calls) > self.max_calls:
                raise RuntimeError(f"session {sid!r} exceeded max_calls_per_session={self.max_calls}")
            log.extend(calls)

    @property
    def app(self) -> Gateway:
        """The ASGI application (the gateway itself) to serve with uvicorn."""
        return self

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """ASGI: `/sessions/{sid}/v1/...` is the server's `/v1/...`, recorded under sid; other paths pass."""
        if scope["type"] == "http":
            m = _PATH.match(scope["path"])
            if m is not None:
                scope = dict(scope, path=m["rest"], raw_path=m["rest"].encode())
                token = _SESSION.set(m["sid"])
                try:
                    return await self._inner(scope, receive, send)
                finally:
                    _SESSION.reset(token)
        await self._inner(scope, receive, send)

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._calls)

    def calls(self, sid: str) -> list[Call]:
        with self._lock:
            return list(self._calls.get(sid, ()))

    def pop(self, sid: str) -> list[Call]:
        with self._lock:
            return self._calls.pop(sid, [])

    def trajectories(self, sid: str, *, pop: bool = True) -> list[Trajectory]:
        """The session's calls stitched into trajectories (see the module docstring)."""
        return stitch(self.pop(sid) if pop else self.calls(sid))

    def episodes(self, sid: str, reward: float, *, group: str, task: dict | None = None,
                 version: int = 0) -> list[Episode]:
        """Rollout episodes of a finished session, each with the agent's `reward` (for group advantages)."""
        out = []
        for k, t in enumerate(self.trajectories(sid)):
            out.append(Episode(uid=f"{sid}/{k}", group=group, task=task or {"id": sid}, seed=0, started=version,
                               prompt_ids=t.prompt_ids, ids=t.ids, logprobs=t.logprobs, mask=t.mask,
                               versions=[version if m else -1 for m in t.mask], status="done", reward=float(reward),
                               turns=t.calls))
        return out


def stitch(calls: Sequence[Call]) -> list[Trajectory]:
    """Calls in order -> trajectories: a call extends the current one iff its prompt starts with everything
    the current one holds (prompt + ids)."""
    out: list[Trajectory] = []
    cur: Trajectory | None = None
    for c in calls:
        full = None if cur is None else cur.prompt_ids + cur.ids
        if cur is not None and len(c.prompt_ids) >= len(full) and c.prompt_ids[: len(full)] == full:
            delta = c.prompt_ids[len(full):]
            cur.ids += delta + c.token_ids
            cur.logprobs += [0.0] * len(delta) + c.logprobs
            cur.mask += [0] * len(delta) + [1] * len(c.token_ids)
            cur.calls += 1
        else:
            cur = Trajectory(list(c.prompt_ids), list(c.token_ids), list(c.logprobs), [1] * len(c.token_ids), 1)
            out.append(cur)
    return out
