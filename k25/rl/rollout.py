"""The rollout manager: thousands of episodes in flight as asyncio coroutines, token-in-token-out buffers,
partial rollouts, timeouts, retries and a staleness bound.

The model is a `TokenPolicy`: `await policy.generate(prompt_ids, max_new_tokens=..., ...)` returning the
sampled ids, their logprobs and the finish reason. `SamplerPolicy` is the in-process continuous-batching
sampler (`k25.infer.Sampler.submit`), `EndpointPolicy` any OpenAI-compatible endpoint that takes token-id
prompts and returns token ids (the k25 server's `/v1/completions` with `return_token_ids`, vLLM), so samplers
can live on other hosts without changing this code. Policy calls are bounded by a semaphore of the sampler's
slots; environments come from an `EnvPool`.

An iteration (`run_iteration`) resumes the episodes carried over from the last one and starts `group_size`
episodes per new task. Each episode may generate at most `tokens_per_iteration` tokens in one iteration (the
partial-rollout budget of Kimi k1.5: a per-trajectory cap, so what an iteration yields does not depend on
timing); an episode that reaches it is suspended with everything recorded so far (ids, logprobs, the weight
version of every token, the environment's messages) and continues in the next iteration from exactly there.
An episode's tokens are its own: a continuation is requested on prompt + everything so far.

Staleness: each generated token records the policy version that sampled it. When an episode is resumed and
its oldest token is more than `max_staleness` versions old, `stale="restart"` drops its tokens and starts it
again, `stale="flag"` keeps it and counts it. A group (the K episodes of one task) is emitted once every
member has finished or failed; failed members (timeouts or policy errors after `max_retries`) are left out.

Every episode ends in exactly one of: finished (in a group), failed, carried over. `IterationResult` and
the counters in `stats` make that checkable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from k25.rl.env import AgentEnv, Task


# ------------------------------------------------------------------------------------------------ policies
@dataclasses.dataclass
class TokenCompletion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (ended on a stop id, kept in token_ids) | "length"


class TokenPolicy(Protocol):
    async def generate(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_p: float,
                       stop_ids: Sequence[int], seed: int) -> TokenCompletion: ...


class SamplerPolicy:
    """The in-process sampler (k25.infer.Sampler); `update_weights` pushes the trainer's new weights. With a
    `media` store (k25.rl.media.MediaStore) a call's `media` (the image references of prompt + tokens so far,
    in order) become the request's pixel arrays, for a K2.5 sampler. The rl stage's sampler never samples a
    media placeholder (`Sampler(suppress_ids=...)`); one given here without that, which does, has the
    completion rejected (ValueError: the episode fails): the trainer's multimodal forward would read the id
    as an image slot, so the trajectory could not be replayed as it was sampled."""

    def __init__(self, sampler: Any, media: Any = None):
        self.sampler, self.media = sampler, media
        self.max_slots, self.max_len = sampler.max_slots, sampler.max_len
        cfg = getattr(sampler, "cfg", None)
        self.placeholders = ({int(cfg.image_token_id), int(cfg.video_token_id)}
                             if media is not None and hasattr(cfg, "image_token_id") else set())

    async def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, stop_ids, seed, media=()):
        from k25.infer import Request

        if media and self.media is None:
            raise ValueError("the episode holds images but this SamplerPolicy has no media store")
        pixels = self.media.request_media(list(media)) if media else {}
        c = await self.sampler.submit(Request(list(prompt_ids), int(max_new_tokens), temperature=temperature,
                                              top_p=top_p, stop_ids=tuple(stop_ids), seed=int(seed), **pixels))
        if self.placeholders.intersection(c.token_ids):
            raise ValueError("the policy sampled a media placeholder id; the trajectory cannot be replayed")
        return TokenCompletion(list(c.token_ids), list(c.logprobs), c.finish_reason)

    def update_weights(self, state: Any) -> None:
        self.sampler.update_weights(state)


class EndpointPolicy:
    """An OpenAI-compatible completions endpoint with token-id prompts (`prompt=[ids]`) and the
    `return_token_ids` extension, through the official client. `stop_token_ids` is sent (vLLM's field); an
    endpoint that ignores it generates on, and the completion is cut after the first stop id here, which is
    the same token sequence (later tokens never change earlier ones)."""

    def __init__(self, model: str, *, base_url: str, api_key: str | None = None, timeout_s: float = 120.0,
                 max_len: int = 0):
        from k25.infer.client import LoopLocalOpenAI

        self.model, self.max_len = model, max_len  # max_len: the endpoint's context (0: unknown)
        self._openai = LoopLocalOpenAI(base_url=base_url, api_key=api_key, timeout_s=timeout_s, max_retries=0)

    async def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, stop_ids, seed):
        resp = await self._openai.get().completions.create(
            model=self.model, prompt=[int(t) for t in prompt_ids], max_tokens=int(max_new_tokens),
            temperature=temperature, top_p=top_p, seed=int(seed), logprobs=0,
            extra_body={"return_token_ids": True, "stop_token_ids": [int(t) for t in stop_ids]})
        choice = resp.model_dump()["choices"][0]
        ids = choice.get("token_ids")
        lps = (choice.get("logprobs") or {}).get("token_logprobs")
        if ids is None or lps is None or len(ids) != len(lps):
            raise RuntimeError(f"endpoint {self.model!r} returned no token ids/logprobs: it must support "
                               "return_token_ids and logprobs on /v1/completions")
        reason = choice.get("finish_reason") or "length"
        stops = set(int(t) for t in stop_ids)
        for i, t in enumerate(ids):
            if int(t) in stops:
                return TokenCompletion([int(x) for x in ids[: i + 1]], [float(x) for x in lps[: i + 1]], "stop")
        return TokenCompletion([int(x) for x in ids], [float(x) for x in lps], "length" if reason == "length"
                               else reason)


# ------------------------------------------------------------------------------------------------ episodes
@dataclasses.dataclass
class Episode:
    """One trajectory, token-in-token-out. `ids` is everything after the prompt: the policy's tokens (mask 1,
    their sampled logprob, the version that sampled them) and the environment's (mask 0, logprob 0,
    version -1). JSON-able via `dataclasses.asdict`, so partial rollouts go into checkpoints."""

    uid: str
    group: str
    task: dict
    seed: int
    started: int  # iteration it was started in
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    media: list[str] = dataclasses.field(default_factory=list)  # image references of prompt + ids, in order
    turn_start: int = 0  # where the current, unfinished assistant turn begins in `ids`
    env_state: dict | None = None
    status: str = "new"  # new | active (suspended, carried) | done | failed
    reward: float = 0.0
    error: str | None = None
    attempts: int = 0
    restarts: int = 0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def response_tokens(self) -> int:
        return int(sum(self.mask))

    def oldest_version(self) -> int | None:
        vs = [v for v in self.versions if v >= 0]
        return min(vs) if vs else None

    def clear(self) -> None:
        self.prompt_ids, self.ids, self.logprobs, self.mask, self.versions, self.media = [], [], [], [], [], []
        self.turn_start, self.env_state, self.status = 0, None, "new"
        self.turns = self.tool_calls = self.tool_errors = 0
        self.truncated, self.info = False, {}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """group_size: K episodes per task. tokens_per_iteration: what one episode may generate per iteration
    (then it is carried over). max_response_tokens: all of an episode's tokens after the prompt (policy and
    environment); reaching it cuts the turn off (truncated). max_turn_tokens: one policy call's
    max_new_tokens. max_inflight: policy calls in flight (default: the sampler's slots).
    generate_timeout_s / episode_timeout_s: wall time of one policy call / of an episode's work in one
    iteration; a timed-out call is retried with the same request, a timed-out episode restarted, each up to
    max_retries times, then the episode fails; 0 = no limit (an in-process sampler, whose first calls
    compile). max_staleness / stale: see the module docstring."""

    group_size: int = 4
    tokens_per_iteration: int = 256
    max_response_tokens: int = 512
    max_turn_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    max_inflight: int = 0
    generate_timeout_s: float = 120.0
    episode_timeout_s: float = 600.0
    max_retries: int = 2
    max_staleness: int = 1
    stale: str = "restart"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("group_size", "tokens_per_iteration", "max_response_tokens", "max_turn_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.stale not in ("restart", "flag"):
            raise ValueError(f"rollout.stale={self.stale!r}: 'restart' (drop and start again) or 'flag' (keep)")
        if self.max_staleness < 0 or self.max_retries < 0:
            raise ValueError("rollout.max_staleness and rollout.max_retries must be >= 0")


class EnvPool:
    """Environments handed out to episodes; at most `size` exist, created by `factory` on demand."""

    def __init__(self, factory: Callable[[], AgentEnv], size: int):
        if size < 1:
            raise ValueError(f"EnvPool size={size} must be >= 1")
        self.factory, self.size = factory, size
        self._free: list[AgentEnv] = []
        self._made = 0
        self.in_use = self.max_in_use = 0
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:  # each asyncio.run is a new loop
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    async def acquire(self) -> AgentEnv:
        cond = self._condition()
        async with cond:
            while not self._free and self._made >= self.size:
                await cond.wait()
            self.in_use += 1
            self.max_in_use = max(self.max_in_use, self.in_use)
            if self._free:
                return self._free.pop()
            self._made += 1
        return self.factory()

    async def release(self, env: AgentEnv) -> None:
        cond = self._condition()
        async with cond:
            self.in_use -= 1
            self._free.append(env)
            cond.notify()

    def close(self) -> None:
        for env in self._free:
            env.close()
        self._free = []


@dataclasses.dataclass
class IterationResult:
    groups: list[list[Episode]]  # groups completed in this iteration (failed members left out)
    finished: list[Episode]  # episodes that finished in this iteration
    failed: list[Episode]
    carried: list[Episode]  # suspended, continue next iteration
    stats: dict[str, float]


class _Suspend(Exception):
    pass


class RolloutManager:
    """See the module docstring. `version` is the policy's weight version (the trainer bumps it)."""

    def __init__(self, policy: TokenPolicy, pool: EnvPool, config: RolloutConfig | None = None):
        self.policy, self.pool = policy, pool
        self.config = config or RolloutConfig()
        self.version = 0
        self.carried: list[Episode] = []
        self.pending: dict[str, dict[str, Any]] = {}  # group -> {"size": K, "done": [Episode], "failed": n}
        self.totals = {"started": 0, "finished": 0, "failed": 0, "restarted_stale": 0, "flagged_stale": 0,
                       "timeouts": 0, "retries": 0}
        self._sem: asyncio.Semaphore | None = None
        self.max_len = int(getattr(policy, "max_len", 0) or 0)  # context limit, when the policy has one

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "carried": [dataclasses.asdict(e) for e in self.carried],
                "pending": {g: {"size": p["size"], "failed": p["failed"],
                                "done": [dataclasses.asdict(e) for e in p["done"]]} for g, p in self.pending.items()},
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.carried = [Episode(**e) for e in state["carried"]]
        self.pending = {g: {"size": p["size"], "failed": p["failed"], "done": [Episode(**e) for e in p["done"]]}
                        for g, p in state["pending"].items()}
        self.totals = dict(state["totals"])

    # --------------------------------------------------------------------------------------- iteration
    def new_episodes(self, tasks: Sequence[Task], iteration: int) -> list[Episode]:
        c = self.config
        out = []
        for t in tasks:
            group = f"{iteration}:{t.id}"
            if group in self.pending:
                raise ValueError(f"task id {t.id!r} appears twice in iteration {iteration}; task ids must be unique")
            self.pending[group] = {"size": c.group_size, "done": [], "failed": 0}
            for k in range(c.group_size):
                seed = zlib.crc32(f"{c.seed}/{group}/{k}".encode())
                out.append(Episode(uid=f"{group}/{k}", group=group, task=t.to_dict(), seed=seed, started=iteration))
        return out

    async def run_iteration(self, tasks: Sequence[Task], iteration: int) -> IterationResult:
        """Resume the carried episodes, start K per task, run until each finishes, fails or hits its budget."""
        c = self.config
        slots = c.max_inflight or getattr(self.policy, "max_slots", 0) or 64
        self._sem = asyncio.Semaphore(slots)
        episodes = list(self.carried) + self.new_episodes(tasks, iteration)
        self.carried = []
        self.totals["started"] += len(tasks) * c.group_size
        await asyncio.gather(*(self._run_episode(e) for e in episodes))
        finished = [e for e in episodes if e.status == "done"]
        failed = [e for e in episodes if e.status == "failed"]
        self.carried = [e for e in episodes if e.status == "active"]
        groups = []
        for e in finished + failed:
            p = self.pending[e.group]
            if e.status == "done":
                p["done"].append(e)
            else:
                p["failed"] += 1
            if len(p["done"]) + p["failed"] == p["size"]:
                if p["done"]:
                    groups.append(sorted(p["done"], key=lambda x: x.uid))
                del self.pending[e.group]
        self.totals["finished"] += len(finished)
        self.totals["failed"] += len(failed)
        stats = {"rollout/episodes": len(episodes), "rollout/finished": len(finished),
                 "rollout/failed": len(failed), "rollout/carried": len(self.carried),
                 "rollout/groups": len(groups),
                 "rollout/mean_turns": sum(e.turns for e in finished) / max(len(finished), 1)}
        return IterationResult(groups, finished, failed, self.carried, stats)

    async def _run_episode(self, ep: Episode) -> None:
        c = self.config
        if ep.status == "active":
            old = ep.oldest_version()
            if old is not None and self.version - old > c.max_staleness:
                if c.stale == "restart":
                    self.totals["restarted_stale"] += 1
                    ep.clear()
                    ep.restarts += 1
                else:
                    self.totals["flagged_stale"] += 1
                    ep.info["stale"] = True
        while True:
            snapshot = dataclasses.replace(ep, ids=list(ep.ids), logprobs=list(ep.logprobs), mask=list(ep.mask),
                                           versions=list(ep.versions), media=list(ep.media), info=dict(ep.info))
            env = await self.pool.acquire()
            try:
                await asyncio.wait_for(self._advance(ep, env), c.episode_timeout_s or None)
                return
            except _Suspend:
                ep.env_state = env.state_dict()
                ep.status = "active"
                return
            except (TimeoutError, _PolicyError) as e:
                timeout = isinstance(e, TimeoutError)
                self.totals["timeouts"] += int(timeout)
                ep.attempts += 1
                if ep.attempts > c.max_retries:
                    ep.status, ep.error = "failed", ("episode timed out" if timeout else str(e))
                    return
                self.totals["retries"] += 1
                # restart this iteration's work from where the iteration found the episode
                keep = ep.attempts
                ep.__dict__.update(snapshot.__dict__)
                ep.attempts = keep
            finally:
                await self.pool.release(env)

    async def _generate(self, prompt: list[int], max_new: int, seed: int, stop_ids: Sequence[int],
                        media: Sequence[str] = ()):
        c = self.config
        last: BaseException | None = None
        extra = {"media": list(media)} if media else {}  # only policies that see images get image references
        for attempt in range(c.max_retries + 1):
            try:
                async with self._sem:
                    return await asyncio.wait_for(self.policy.generate(
                        prompt, max_new_tokens=max_new, temperature=c.temperature, top_p=c.top_p,
                        stop_ids=stop_ids, seed=seed, **extra), c.generate_timeout_s or None)
            except asyncio.CancelledError:
                raise
            except (ValueError, TypeError) as e:  # the request itself is bad (e.g. too long): retrying cannot help
                raise _PolicyError(f"policy rejected the request: {e}") from e
            except Exception as e:  # noqa: BLE001 - a failing backend: retried, then the episode fails
                last = e
                self.totals["timeouts"] += int(isinstance(e, TimeoutError))
                if attempt < c.max_retries:
                    self.totals["retries"] += 1
        raise _PolicyError(f"policy call failed after {c.max_retries + 1} attempts: {type(last).__name__}: {last}")

    async def _advance(self, ep: Episode, env: AgentEnv) -> None:
        c = self.config
        if ep.status == "new":
            ep.prompt_ids = env.reset(Task.from_dict(ep.task))
            ep.media = _media(env)
            ep.status = "active"
        else:
            await env.restore(ep.env_state)
        used = 0
        while True:
            left = c.max_response_tokens - len(ep.ids)
            if self.max_len:  # the policy's context: prompt + everything so far + new tokens
                left = min(left, self.max_len - len(ep.prompt_ids) - len(ep.ids))
            room = min(c.max_turn_tokens, c.tokens_per_iteration - used, left)
            if left <= 0:
                await self._end_turn(ep, env)  # out of room: the turn is cut off and judged
                return
            if room <= 0:
                raise _Suspend
            seed = zlib.crc32(f"{ep.seed}/{ep.restarts}/{len(ep.ids)}".encode())
            comp = await self._generate(ep.prompt_ids + ep.ids, room, seed, env.fmt.stop_ids, ep.media)
            if not comp.token_ids:
                raise _PolicyError("the policy returned an empty completion")
            n = len(comp.token_ids)
            ep.ids += [int(t) for t in comp.token_ids]
            ep.logprobs += [float(x) for x in comp.logprobs]
            ep.mask += [1] * n
            ep.versions += [self.version] * n
            used += n
            if comp.finish_reason == "stop":
                if await self._end_turn(ep, env):
                    return

    async def _end_turn(self, ep: Episode, env: AgentEnv) -> bool:
        """Hand the finished turn to the environment; True when the episode is over."""
        obs, reward, done, info = await env.step(ep.ids[ep.turn_start:])
        ep.turns += 1
        ep.tool_calls += info.get("tool_calls", 0)
        ep.tool_errors += info.get("tool_errors", 0)
        if done:
            ep.status, ep.reward, ep.truncated = "done", float(reward), bool(info.get("truncated"))
            ep.info.update({k: v for k, v in info.items() if k in ("components", "gated", "judge_failed")})
            ep.env_state = None
            return True
        room = self.config.max_response_tokens - len(ep.ids)
        if len(obs) >= room:  # the environment's reply does not fit: end the episode as cut off
            ep.status, ep.reward, ep.truncated = "done", 0.0, True
            cut_off = getattr(env, "cut_off", None)  # AgentEnv's; a bare Gym-like env may not have one
            components = cut_off() if cut_off is not None else {}
            if components:
                ep.info["components"] = components
            ep.env_state = None
            return True
        ep.ids += obs
        ep.media = _media(env)
        ep.logprobs += [0.0] * len(obs)
        ep.mask += [0] * len(obs)
        ep.versions += [-1] * len(obs)
        ep.turn_start = len(ep.ids)
        return False


class _PolicyError(RuntimeError):
    pass


def _media(env: Any) -> list[str]:
    """The environment's image references so far (environments without images have none)."""
    media = getattr(env, "media", None)
    return list(media()) if media is not None else []


def run_iteration_sync(manager: RolloutManager, tasks: Sequence[Task], iteration: int) -> IterationResult:
    """`run_iteration` from synchronous code (the trainer's data iterator)."""
    return asyncio.run(manager.run_iteration(tasks, iteration))
