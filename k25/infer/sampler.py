"""The sampler: continuous batching over a fixed number of cache slots, token-in-token-out.

`Sampler(model, max_slots=S, max_len=T)` holds one compressed cache of S slots x T positions
(k25/infer/cache.py). Each engine step first prefills queued requests into free slots (one jitted prefill
per request, its prompt padded to a power-of-two bucket), then runs one jitted decode step for all S slots
at once (idle slots compute and are ignored). A request that hits a stop id or its max_new_tokens frees its
slot at once, and the next step prefills a queued request into it while the others keep decoding
(`scheduling="static"` instead waits for every slot to drain before admitting more: the baseline of the
sample benchmark). Shapes are static: one compile per prefill bucket and per decode window bucket.

`generate(requests)` drives the engine on the calling thread until its requests finish; `await submit(r)`
queues r and lets one background task per event loop step the engine on a worker thread, so concurrent
submits (rollouts, the server) share the continuous batch. Both may run at once; a lock serialises steps.
`async for x in stream(r)` is submit's one code path with the tokens shown: it yields each sampled `Token`
(id, logprob, top logprobs) as the step that sampled it ends, then the `Completion`, so a server can send text
while the sequence is still decoding. Events cross from the worker thread to the caller's event loop with
`call_soon_threadsafe`; submit skips the per-token events. A stream or submit abandoned by its caller (a
closed iterator, a cancelled task) cancels its request: the next step frees its slot or drops it from the queue.

Completions carry the prompt ids, the sampled ids (a stop id that ended the sequence is included, since the
model sampled it and the trainer scores it), the temperature-1 logprob of each sampled token and the finish
reason. With a `mesh`, slots are split over the batch axes ("dp", "ep") and experts over "ep", through the
model's own expert-parallel MoE (k25/parallel/expert.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k25.infer.cache import init_cache
from k25.infer.forward import decode, prefill
from k25.infer.sampling import TOP_LOGPROBS, sample, suppress_logits
from k25.model.config import K2Config
from k25.model.decoder import K2Model
from k25.model.k25 import K25Model, check_placeholders
from k25.model.moonvit import normalize_grid, tokens_per_chunk
from k25.parallel.mesh import BATCH_AXES, state_shardings

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    stop_ids end the completion when sampled (the stop id is kept in `token_ids`); seed fixes every sampled
    token whatever else is in the batch. top_logprobs (<= 20) asks for that many most likely alternatives per
    token. pixel_values/grid_thw (images) and pixel_values_videos/video_grid_thw (video chunks) are the HF
    processor's arrays, for a K25Model whose prompt holds one placeholder id per media token.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: Sequence[int] = ()
    seed: int = 0
    top_logprobs: int = 0
    pixel_values: Any = None
    grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model at temperature 1, before top-k/top-p
    finish_reason: str  # "stop" (a stop id was sampled) or "length" (max_new_tokens reached)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per token, if asked


@dataclasses.dataclass(frozen=True)
class Token:
    """One sampled token of a streamed request (`Sampler.stream`), as it will appear in the Completion."""

    id: int
    logprob: float  # log p(id) at temperature 1, as in Completion.logprobs
    top_logprobs: list[tuple[int, float]]  # the request's top_logprobs alternatives; [] when none were asked


@dataclasses.dataclass
class _Pending:
    request: Request
    prompt: list[int]
    loop: asyncio.AbstractEventLoop | None = None  # the caller's loop (submit/stream); None for generate
    sink: Callable[[Any], None] | None = None  # runs on `loop`: gets Tokens (if `tokens`), then the result/error
    tokens: bool = False
    cancelled: bool = False  # set by the caller's side; the engine frees the request at its next step
    result: Completion | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class _Active:
    pending: _Pending
    stop: frozenset
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)


def _pow2_bucket(n: int, lo: int, hi: int) -> int:
    return min(max(lo, 1 << max(n - 1, 0).bit_length()), hi)


def _seed_words(seed: int) -> np.ndarray:
    s = int(seed) % (1 << 64)
    return np.array([s & 0xFFFFFFFF, s >> 32], np.uint32)


class Sampler:
    """Continuous-batching sampler over a K2Model or K25Model (see the module docstring)."""

    def __init__(self, model: K2Model | K25Model, *, max_slots: int, max_len: int, cache_dtype: Any = jnp.bfloat16,
                 mesh: Mesh | None = None, scheduling: str = "continuous", min_bucket: int = 16,
                 suppress_ids: Sequence[int] = ()):
        if not isinstance(model, (K2Model, K25Model)):
            raise TypeError(f"Sampler needs a K2Model or K25Model, got {type(model).__name__}.")
        if int(max_slots) < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1.")
        if int(max_len) < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 (a prompt token and a new token).")
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling={scheduling!r} must be 'continuous' or 'static'.")
        self.multimodal = isinstance(model, K25Model)
        self.cfg = model.cfg
        self.text_cfg: K2Config = model.cfg.text_config if self.multimodal else model.cfg
        self.max_slots, self.max_len = int(max_slots), int(max_len)
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.scheduling = scheduling
        self.min_bucket = int(min_bucket)
        # ids never sampled (e.g. a K2.5 policy's media placeholders, which only the processor may insert); the
        # logprobs are then those of the distribution over the other ids (k25.infer.sampling.suppress_logits)
        self.suppress_ids = tuple(sorted({int(t) for t in suppress_ids}))
        bad = [t for t in self.suppress_ids if not 0 <= t < self.text_cfg.vocab_size]
        if bad:
            raise ValueError(f"suppress_ids {bad} lie outside the vocabulary [0, {self.text_cfg.vocab_size}).")
        if len(self.suppress_ids) >= self.text_cfg.vocab_size:
            raise ValueError("suppress_ids covers the whole vocabulary: nothing could be sampled.")
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        self._cache_sharding = None
        self._state_sharding = None
        if mesh is not None:
            axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
            shards = math.prod(mesh.shape[a] for a in axes)
            if self.max_slots % shards:
                raise ValueError(f"max_slots={max_slots} must be divisible by the mesh's data shards "
                                 f"({'x'.join(axes)} = {shards}): slots are split over them.")
            self._state_sharding = state_shardings(state, mesh)
            self._cache_sharding = NamedSharding(mesh, P(None, axes or None, None, None))
        self.state = self._place(state)
        self._reset_cache()
        S = self.max_slots
        self._tokens = np.zeros(S, np.int32)
        self._positions = np.zeros(S, np.int32)
        self._temperature = np.zeros(S, np.float32)
        self._top_p = np.ones(S, np.float32)
        self._top_k = np.zeros(S, np.int32)
        self._seeds = np.zeros((S, 2), np.uint32)
        self._index = np.zeros(S, np.int32)
        self._slots: list[_Active | None] = [None] * S
        self._queue: deque[_Pending] = deque()
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="k25-sampler")
        self._workers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self._embed_fn, self._prefill_fn, self._decode_fn = _compiled(self.graphdef, self.multimodal,
                                                                      self.suppress_ids)

    # ------------------------------------------------------------------------------------- weights
    @property
    def vocab_size(self) -> int:
        return self.text_cfg.vocab_size

    def _place(self, state: nnx.State) -> nnx.State:
        if self._state_sharding is None:
            return state
        placed = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(placed, jax.device_put(nnx.to_pure_dict(state), self._state_sharding))
        return placed

    def _reset_cache(self) -> None:
        cache = init_cache(self.text_cfg, self.max_slots, self.max_len, self.cache_dtype)
        self.cache = cache if self._cache_sharding is None else jax.device_put(cache, self._cache_sharding)

    def update_weights(self, model_or_state: Any) -> None:
        """New weights, same shapes (no recompilation): an nnx Module, an nnx.State, a pure dict of (part of) its
        state, or anything with `.params` and `.buffers` pure dicts (a TrainState). Values are cast to the
        dtypes the sampler holds; a missing or mis-shaped leaf is a ValueError naming it."""
        x = model_or_state
        if isinstance(x, nnx.Module):
            x = nnx.state(x)
        if isinstance(x, nnx.State):
            x = nnx.to_pure_dict(x)
        parts = [x.params, x.buffers] if hasattr(x, "params") and hasattr(x, "buffers") else [x]
        with self._lock:
            new = jax.tree.map(lambda a: a, self.state)
            current = nnx.to_pure_dict(self.state)
            for part in parts:
                if not isinstance(part, dict):
                    raise TypeError(f"update_weights: expected a model, nnx.State or dict, got {type(part).__name__}.")
                _check_like(part, current, "state")
                nnx.replace_by_pure_dict(new, jax.tree.map(jnp.asarray, part))
            new = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), new, self.state)
            self.state = self._place(new)

    # ----------------------------------------------------------------------------------- jitted work
    def _ambient(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # -------------------------------------------------------------------------------------- requests
    def validate(self, request: Request) -> list[int]:
        """The prompt as a list of ints, or a ValueError/TypeError naming the bad field and the fix."""
        if not isinstance(request, Request):
            raise TypeError(f"expected a k25.infer.Request, got {type(request).__name__}.")
        r = request
        try:
            prompt = [int(t) for t in r.prompt_ids]
        except (TypeError, ValueError) as e:
            raise TypeError("prompt_ids must be a sequence of int token ids.") from e
        if not prompt:
            raise ValueError("prompt_ids is empty: give at least one token.")
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, (int, np.integer)) \
                or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={r.max_new_tokens!r} must be an int >= 1.")
        n, m = len(prompt), int(r.max_new_tokens)
        if n + m > self.max_len:
            raise ValueError(f"prompt_ids has {n} tokens and max_new_tokens={m}: {n + m} exceeds the sampler's "
                             f"max_len={self.max_len}; shorten the prompt or lower max_new_tokens "
                             f"(at most {max(self.max_len - n, 0)} for this prompt).")
        media_ids = {self.cfg.image_token_id, self.cfg.video_token_id} if self.multimodal else set()
        bad = [t for t in prompt if not (0 <= t < self.vocab_size or t in media_ids)]
        if bad:
            raise ValueError(f"prompt_ids holds {bad[:5]} outside the vocabulary [0, {self.vocab_size}).")
        if not (math.isfinite(r.temperature) and r.temperature >= 0):
            raise ValueError(f"temperature={r.temperature} must be a finite number >= 0 (0 = greedy).")
        if not (0 < r.top_p <= 1):
            raise ValueError(f"top_p={r.top_p} must lie in (0, 1].")
        if int(r.top_k) != r.top_k or r.top_k < 0:
            raise ValueError(f"top_k={r.top_k} must be an int >= 0 (0 = no top-k filter).")
        if int(r.top_logprobs) != r.top_logprobs or not 0 <= r.top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={r.top_logprobs} must be an int in [0, {TOP_LOGPROBS}].")
        try:
            [int(t) for t in r.stop_ids]
            int(r.seed)
        except (TypeError, ValueError) as e:
            raise TypeError("stop_ids must be a sequence of ints and seed an int.") from e
        media = [(r.pixel_values, r.grid_thw, "pixel_values", "grid_thw"),
                 (r.pixel_values_videos, r.video_grid_thw, "pixel_values_videos", "video_grid_thw")]
        for px, grid, px_name, grid_name in media:
            if px is None and grid is None:
                continue
            if not self.multimodal:
                raise ValueError(f"{px_name} was given but the model is a text-only K2Model; use a K25Model.")
            if px is None or grid is None:
                raise ValueError(f"{px_name} and {grid_name} must be given together.")
        if self.multimodal:
            merge = self.cfg.vision_config.merge_kernel_size
            for px, grid, _, _ in media:
                token = self.cfg.image_token_id if px is r.pixel_values else self.cfg.video_token_id
                expected = sum(tokens_per_chunk(normalize_grid(grid), merge)) if px is not None else 0
                check_placeholders(np.asarray(prompt), token, expected)
        return prompt

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Run `requests` through the continuous batch; completions in request order."""
        pendings = [_Pending(r, self.validate(r)) for r in requests]
        with self._lock:
            self._queue.extend(pendings)
        while not all(p.done.is_set() for p in pendings):
            if not self._step():  # another thread holds our requests' slots: wait for it
                pendings[0].done.wait(0.01)
        for p in pendings:
            if p.error is not None:
                raise p.error
        return [p.result for p in pendings]

    async def submit(self, request: Request) -> Completion:
        """Queue one request on the shared continuous batch and wait for its completion."""
        result = None
        async for result in self._follow(request, self.validate(request), tokens=False):  # noqa: B007 (the last item)
            pass
        return result

    def stream(self, request: Request) -> AsyncIterator[Token | Completion]:
        """An async iterator over one request: a `Token` per sampled token as it is sampled, then the Completion.

        The request is validated here (a bad request raises before anything is queued) and queued on the shared
        continuous batch when iteration starts; the tokens and the Completion are exactly submit's. Closing the
        iterator early (`aclose`, a cancelled consumer) cancels the request and frees its slot at the next step.
        """
        return self._follow(request, self.validate(request), tokens=True)

    async def _follow(self, request: Request, prompt: list[int], *, tokens: bool) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        pending = _Pending(request, prompt, loop=loop, sink=events.put_nowait, tokens=tokens)
        with self._lock:
            self._queue.append(pending)
        worker = self._workers.get(loop)
        if worker is None or worker.done():
            self._workers = {lp: t for lp, t in self._workers.items() if not t.done()}
            self._workers[loop] = loop.create_task(self._drive())
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            if not pending.done.is_set():
                pending.cancelled = True

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._has_work():
            await loop.run_in_executor(self._executor, self._step)

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._queue) or any(a is not None for a in self._slots)

    # ---------------------------------------------------------------------------------------- engine
    def _step(self) -> bool:
        """Admit what fits, then one decode step for every slot. False when there was nothing to do."""
        with self._lock:
            self._drop_cancelled()
            if not self._has_work():
                return False
            try:
                self._admit()
                if any(a is not None for a in self._slots):
                    self._decode_step()
            except Exception as e:  # a failed device call: fail every request in flight, keep serving
                self._fail_all(e)
            return True

    def _drop_cancelled(self) -> None:
        """Free the slots and queue places of requests their callers abandoned."""
        for i, a in enumerate(self._slots):
            if a is not None and a.pending.cancelled:
                self._slots[i] = None
                a.pending.done.set()
        if any(p.cancelled for p in self._queue):
            for p in self._queue:
                if p.cancelled:
                    p.done.set()
            self._queue = deque(p for p in self._queue if not p.cancelled)

    def _admit(self) -> None:
        free = [i for i, a in enumerate(self._slots) if a is None]
        if self.scheduling == "static" and len(free) < self.max_slots:
            return
        for slot in free:
            if not self._queue:
                return
            self._prefill(slot, self._queue.popleft())

    def _prefill(self, slot: int, pending: _Pending) -> None:
        r, prompt = pending.request, pending.prompt
        n = len(prompt)
        bucket = _pow2_bucket(n, self.min_bucket, self.max_len)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = prompt
        grid = normalize_grid(r.grid_thw) if r.pixel_values is not None else ()
        vgrid = normalize_grid(r.video_grid_thw) if r.pixel_values_videos is not None else ()
        px = None if r.pixel_values is None else jnp.asarray(r.pixel_values)
        pxv = None if r.pixel_values_videos is None else jnp.asarray(r.pixel_values_videos)
        seed = _seed_words(r.seed)
        with self._ambient():
            embeds = self._embed_fn(self.state, jnp.asarray(ids), px, grid, pxv, vgrid)
            self.cache, tok, lp, tids, tlps = self._prefill_fn(
                self.state, self.cache, embeds, np.int32(n), np.int32(slot), np.float32(r.temperature),
                np.float32(r.top_p), np.int32(r.top_k), seed)
        active = _Active(pending, frozenset(int(t) for t in r.stop_ids))
        self._slots[slot] = active
        self._tokens[slot], self._positions[slot], self._index[slot] = 0, n, 1
        self._temperature[slot], self._top_p[slot], self._top_k[slot] = r.temperature, r.top_p, r.top_k
        self._seeds[slot] = seed
        self._record(slot, int(tok), float(lp), np.asarray(tids), np.asarray(tlps))

    def _decode_step(self) -> None:
        live = [i for i, a in enumerate(self._slots) if a is not None]
        positions = np.where([a is not None for a in self._slots], self._positions, 0).astype(np.int32)
        window = _pow2_bucket(int(positions.max()) + 1, self.min_bucket, self.max_len)
        with self._ambient():
            self.cache, tok, lp, tids, tlps = self._decode_fn(
                self.state, self.cache, self._tokens, positions, self._temperature, self._top_p, self._top_k,
                self._seeds, self._index, window=window)
        tok, lp, tids, tlps = (np.asarray(a) for a in (tok, lp, tids, tlps))
        for i in live:
            self._positions[i] += 1
            self._index[i] += 1
            self._record(i, int(tok[i]), float(lp[i]), tids[i], tlps[i])

    def _record(self, slot: int, token: int, logprob: float, top_ids: np.ndarray, top_lps: np.ndarray) -> None:
        """Append a sampled token to the slot's completion; finish and free the slot on stop or length."""
        a = self._slots[slot]
        r = a.pending.request
        top = [(int(i), float(v)) for i, v in zip(top_ids[: r.top_logprobs], top_lps[: r.top_logprobs])]
        a.tokens.append(token)
        a.logprobs.append(logprob)
        if r.top_logprobs:
            a.top.append(top)
        if a.pending.tokens:
            self._emit(a.pending, Token(token, logprob, top))
        if token in a.stop:
            reason = "stop"
        elif len(a.tokens) >= r.max_new_tokens:
            reason = "length"
        else:
            self._tokens[slot] = token
            return
        self._slots[slot] = None
        self._deliver(a.pending, Completion(a.pending.prompt, a.tokens, a.logprobs, reason, a.top))

    def _deliver(self, pending: _Pending, result: Completion | None, error: BaseException | None = None) -> None:
        pending.result, pending.error = result, error
        pending.done.set()
        self._emit(pending, error if error is not None else result)

    @staticmethod
    def _emit(pending: _Pending, item: Any) -> None:
        """Hand `item` to the request's caller on its own event loop (this runs on the stepping thread)."""
        if pending.sink is None or pending.cancelled:
            return
        try:
            pending.loop.call_soon_threadsafe(pending.sink, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pending.cancelled = True

    def _fail_all(self, error: BaseException) -> None:
        for i, a in enumerate(self._slots):
            if a is not None:
                self._deliver(a.pending, None, error)
                self._slots[i] = None
        while self._queue:
            self._deliver(self._queue.popleft(), None, error)
        self._reset_cache()


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, multimodal: bool, suppress: tuple[int, ...] = ()) -> tuple[Any, Any, Any]:
    """(embed, prefill, decode) jitted for one model structure; shared by every Sampler of that structure, so a
    second sampler (another scheduling policy, a restarted server) reuses the compiled buckets."""

    def language_model(state: nnx.State) -> tuple[nnx.Module, K2Model]:
        model = nnx.merge(graphdef, state)
        return model, (model.language_model if multimodal else model)

    def embed_impl(state, ids, pixel_values, grid, pixel_values_videos, video_grid):
        model, lm = language_model(state)
        if not multimodal:
            return lm.embed(ids)
        return model.embed(ids, pixel_values, grid or None, pixel_values_videos, video_grid or None)

    def prefill_impl(state, cache, embeds, length, slot, temperature, top_p, top_k, seed):
        logits, cache = prefill(language_model(state)[1], embeds, length, slot, cache)
        out = sample(suppress_logits(logits, suppress), temperature[None], top_p[None], top_k[None], seed[None],
                     jnp.zeros((1,), jnp.int32))
        return cache, *(o[0] for o in out)

    def decode_impl(state, cache, tokens, positions, temperature, top_p, top_k, seeds, index, *, window):
        logits, cache = decode(language_model(state)[1], tokens, positions, cache, window)
        return cache, *sample(suppress_logits(logits, suppress), temperature, top_p, top_k, seeds, index)

    return (jax.jit(embed_impl, static_argnums=(3, 5)), jax.jit(prefill_impl, donate_argnums=(1,)),
            jax.jit(decode_impl, donate_argnums=(1,), static_argnames=("window",)))


def _check_like(part: dict, ref: dict, path: str) -> None:
    """Every leaf of `part` exists in `ref` with the same shape."""
    for k, v in part.items():
        where = f"{path}.{k}"
        if k not in ref:
            raise ValueError(f"update_weights: {where} is not in the sampler's model; pass weights of the same "
                             "architecture.")
        if isinstance(v, dict):
            if not isinstance(ref[k], dict):
                raise ValueError(f"update_weights: {where} is a subtree but the model holds an array there.")
            _check_like(v, ref[k], where)
        elif np.shape(v) != np.shape(ref[k]):
            raise ValueError(f"update_weights: {where} has shape {np.shape(v)}, the sampler's model "
                             f"{np.shape(ref[k])}; new weights must keep every shape (no recompilation).")
