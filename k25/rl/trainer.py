"""The RL stage (`config.stage="rl"`): Eq. 1 on the existing runtime (k25.train.loop), rollouts from the
in-process sampler with the current weights.

The loop stays the one training loop: it calls the data iterator's `observe_state(state, step)` before
drawing each batch, and this stage's iterator pushes those weights into its sampler (copies, since the step
donates the state) and bumps the policy version. `next()` then runs rollout iterations (k25.rl.rollout) until
`batch_size` trajectories of complete groups are ready, applies Toggle, computes the group advantages and
returns one row per trajectory: prompt + response ids, the sampler's logprobs, the loss mask (1 on tokens
the policy sampled, 0 on prompt, tool/environment and padding tokens) and the advantage. Its `get_state` /
`set_state` (JSON, saved by the loop's orbax checkpoints) hold the task cursor, the partial rollouts, the
pending groups, the rollout buffer and Toggle's budgets, so a killed run resumes exactly.

The loss is `k25.rl.loss.policy_loss` with the batch's N (response tokens of the whole batch) as the
normaliser, returned as the sum the step divides by N, so gradient accumulation stays exact.

The policy is a K2 decoder (`config.model`) or, when the model config has a vision part (`config.init_from`
holding a K2.5 run, or `config.lm` + `config.vision`), a K25Model: its episodes carry their images as
references (k25.rl.media; vision tasks in k25.rl.vision), the sampler prefills their pixels, and the batch
goes through the joint stage's planning (`k25.train.multimodal.prepare_batch`) with the old logprobs and
advantages beside the text arrays, so Eq. 1 runs through the multimodal forward (DEP when `config.dep`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k25.data.chat import byte_chat_format, load_chat_format
from k25.data.synthetic import make_task
from k25.infer.sampling import suppress_logits
from k25.model.decoder import K2Model
from k25.model.k25 import K25Model
from k25.model.params import count_params
from k25.model.vision_config import K25Config
from k25.parallel.dep import step_loss_fn
from k25.parallel.mesh import make_mesh
from k25.rl import vision
from k25.rl.env import AgentEnv, ChatTurns, PlainTurns, RewardJudge, Task
from k25.rl.loss import PolicyLossConfig, group_advantages, policy_loss
from k25.rl.media import MediaStore
from k25.rl.rollout import EnvPool, Episode, IterationResult, RolloutConfig, RolloutManager, SamplerPolicy
from k25.rl.toggle import Toggle, ToggleConfig
from k25.rl.weight_noise import perturb_weights
from k25.train.init_from import copy_into
from k25.train.joint import stack_rows, vision_budgets
from k25.train.multimodal import dep_enabled, prepare_batch
from k25.train.pretrain import TextLMStage
from k25.train.state import split_model
from k25.train.step import StepConfig

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask", "old_logp", "advantages",
              "n_total")


def default_rl_config() -> ml_collections.ConfigDict:
    """Every field of the stage with its default (see BUILD_NOTES.md, "RL trainer")."""
    rl = ml_collections.ConfigDict()
    rl.group_size = 8  # K responses per prompt; batch_size = prompts_per_step * group_size
    rl.tasks = ml_collections.ConfigDict({"reasoning": 1.0})  # synthetic task -> sampling weight
    rl.format = "plain"  # "plain" (bos + prompt, answer to eos, as the lm stage trains) | "chat" (Kimi format)
    rl.chat_format = "byte"  # with format="chat": "byte" or an HF tokenizer directory
    rl.thinking = False
    rl.reward = ml_collections.ConfigDict({"weights": {"exact_match": 1.0}})  # a k25.rl.rewards.RewardSpec
    # the GRM behind a spec that weights "grm": an inspect-style model name, "openai/NAME" (JUDGE_BASE_URL /
    # JUDGE_API_KEY, else the OPENAI_ ones) or "k25/PATH" (a checkpoint in-process); "" = no judge
    rl.judge = ""
    rl.judge_fallback = -1.0  # a score in [0, 1] to stand in when the judge gives none; < 0: the step fails
    rl.max_turns = 1
    rl.std_normalize = False  # GRPO's advantage (r - mean) / std; Eq. 1 does not divide
    # DAPO's dynamic sampling: a complete group whose K rewards (after Toggle) are all equal has zero advantage
    # everywhere and only dilutes the batch; drop it before the batch is laid out (`dropped_uniform_groups`)
    # and keep sampling prompts until the batch is full of groups that carry a signal
    rl.drop_uniform_groups = False
    # with drop_uniform_groups: at most this many rollout iterations per step; if the batch is still not full
    # then (a policy that solves or fails every prompt), it is laid out part-filled (`batch_fill` < 1)
    rl.max_iterations_per_step = 32
    # 0: every training prompt is a new draw of the task stream; N > 0: training cycles over the stream's first N
    # prompts (epochs over a fixed set). With Toggle on, a pool's budgets are fitted once before the first step
    # from K responses of the starting policy per prompt (Eq. 2: "estimated once at the beginning of training")
    rl.prompt_pool = 0
    rl.loss = ml_collections.ConfigDict(dataclasses.asdict(PolicyLossConfig()))
    # no wall-time limits on the in-process sampler by default: its first calls compile, and a timeout would
    # make what a step trains on depend on the machine's speed (and break exact resumes)
    rl.rollout = ml_collections.ConfigDict(dataclasses.asdict(RolloutConfig(generate_timeout_s=0.0,
                                                                            episode_timeout_s=0.0)))
    rl.toggle = ml_collections.ConfigDict(dataclasses.asdict(ToggleConfig(enabled=False)))
    rl.sampler = ml_collections.ConfigDict(dict(
        max_slots=64,
        dtype="",  # the sampler's compute and parameter dtype; "" = the trainer's (config.model)
        # relative std of the seeded noise multiplied into the rollout sampler's weights at every push
        # (k25.rl.weight_noise): a train/inference mismatch of chosen size; 0 = the trainer's weights exactly
        weight_noise=0.0,
        cache_dtype="float32",
        min_bucket=64,  # smallest prefill/decode-window bucket: short contexts compile one shape
        eval_max_new_tokens=16,  # per turn of a held-out episode
        eval_max_response_tokens=0,  # a held-out episode's tokens after the prompt; 0 = eval_max_new_tokens
    ))
    rl.vision = vision.default_vision_config()  # tool and image limits of `vision/<kind>` tasks
    return rl


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _task_to_rl(source: str, index: int, ex: dict) -> Task:
    """A synthetic example as an RL task: its `target` (else its `answer`) for the rule rewards, its `reference`
    for the GRM, and its `category` kept in `meta`."""
    return Task(id=f"{source}:{index}", messages=[{"role": "user", "content": ex["prompt"]}],
                target=ex.get("target", ex["answer"]), reference=ex.get("reference"),
                meta={"category": ex["category"]} if "category" in ex else {})


def make_judge(rl: ml_collections.ConfigDict) -> RewardJudge:
    """The stage's reward: `rl.reward`'s spec, with the GRM of `rl.judge` when the spec weights "grm"."""
    from k25.rl.rewards import GRMJudge, RewardSpec, judge_client
    from k25.rl.rewards.spec import GRM

    spec = RewardSpec.from_mapping(rl.reward.to_dict())
    if GRM not in spec.weights:
        return RewardJudge(spec)
    if not rl.judge:
        raise ValueError("config.rl.reward weights 'grm' but config.rl.judge is empty; name the judge model, "
                         "e.g. --config.rl.judge=openai/NAME (JUDGE_BASE_URL) or k25/PATH")
    fallback = float(rl.judge_fallback)
    grm = GRMJudge(judge_client(rl.judge), fallback=fallback if fallback >= 0 else None)
    return RewardJudge(spec, grm)


class RLStage(TextLMStage):
    """Model, optimizer settings and init_from as the `lm` stage (a text policy) or the `sft` stage (a K2.5
    policy); rollouts, Eq. 1 and held-out accuracy here."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.media: MediaStore | None = None
        if config.get("model") is None:
            self._init_k25(config)
        else:
            super().__init__(config)
            self.multimodal, self.text_cfg = False, self.model_cfg
        rl = config.rl
        self.rl = rl
        self.loss_cfg = PolicyLossConfig.from_mapping(rl.loss.to_dict())
        self.rollout_cfg = RolloutConfig(**rl.rollout.to_dict())
        if rl.group_size != self.rollout_cfg.group_size:
            self.rollout_cfg = dataclasses.replace(self.rollout_cfg, group_size=int(rl.group_size))
        if config.seed:  # the run's seed reaches the sampling too (seed 0 keeps rl.rollout.seed as it is)
            self.rollout_cfg = dataclasses.replace(self.rollout_cfg,
                                                   seed=int(self.rollout_cfg.seed) + 1_000_003 * int(config.seed))
        if config.batch_size % rl.group_size:
            raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of config.rl.group_size="
                             f"{rl.group_size} (a batch holds whole groups)")
        if self.loss_cfg.normalization == "sequence" and config.optim.accum_steps > 1:
            raise ValueError("config.rl.loss.normalization='sequence' is a per-microbatch mean; use "
                             "config.optim.accum_steps=1 with it")
        if not float(rl.sampler.get("weight_noise", 0.0)) >= 0:
            raise ValueError(f"config.rl.sampler.weight_noise={rl.sampler.weight_noise}: a relative noise scale "
                             ">= 0 (0 = the trainer's weights exactly)")
        self.toggle_cfg = ToggleConfig(**rl.toggle.to_dict())
        self.prompt_pool = int(rl.get("prompt_pool", 0))
        if self.prompt_pool and self.prompt_pool < config.batch_size // rl.group_size:
            raise ValueError(f"config.rl.prompt_pool={self.prompt_pool} is smaller than the prompts of one step "
                             f"({config.batch_size // rl.group_size} = batch_size / group_size): a step's prompts "
                             "must differ; raise it, or 0 for a fresh prompt every draw")
        if self.prompt_pool < 0:
            raise ValueError(f"config.rl.prompt_pool={self.prompt_pool} must be >= 0 (0 = no pool)")
        synthetic = (config.get("data") or {}).get("synthetic") or {}
        self.sources = {name: vision.VisionSource(name) if vision.is_vision(name) else
                        make_task(name, **dict(synthetic.get(name, {}))) for name in rl.tasks}
        if not self.multimodal and any(map(vision.is_vision, self.sources)):
            raise ValueError(f"config.rl.tasks has vision tasks {[n for n in self.sources if vision.is_vision(n)]} "
                             "but the policy is text-only (config.model); start from a K2.5 run with "
                             "config.init_from and no config.model")
        self.weights = np.array([rl.tasks[n] for n in self.sources], np.float64)
        if not len(self.sources) or (self.weights <= 0).any():
            raise ValueError("config.rl.tasks needs at least one synthetic task with a weight > 0")
        self.weights /= self.weights.sum()
        if rl.format == "plain":
            self.fmt = PlainTurns(self.tokenizer)
        elif rl.format == "chat":
            chat = byte_chat_format() if rl.chat_format == "byte" else load_chat_format(rl.chat_format)
            chat.check_vocab(self.text_cfg.vocab_size)
            self.fmt = ChatTurns(chat, thinking=rl.thinking, media=self.media)
        else:
            raise ValueError(f"config.rl.format={rl.format!r}: 'plain' or 'chat'")
        if self.multimodal and rl.format != "chat":
            raise ValueError(f"config.rl.format={rl.format!r}: a K2.5 policy runs the chat format (images render "
                             "as placeholders there); set config.rl.format='chat'")
        self.judge = make_judge(rl)
        self.sampler = None  # built at the first observe_state (needs concrete weights)
        self._text_eval = None

    def _init_k25(self, config: ml_collections.ConfigDict) -> None:
        """The K2.5 policy: weights and config as the sft stage reads them (`init_from`, or `lm` + `vision`)."""
        from k25.train.sft import SFTStage, with_chat_media_ids

        self.config = config
        if not config.get("init_from") and config.get("vision") is None:
            raise ValueError(
                "the rl stage has no policy: set config.init_from to a K2.5 run directory or HF checkpoint (for "
                "vision RL a K2.5 SFT run, e.g. `python -m experiments.run --config=experiments/zero_vision_sft.py"
                ":base --workdir=/tmp/zv/base`, then `...zero_vision_sft.py:zero_vision --workdir=/tmp/zv/"
                "zero_vision`, and --config.init_from=/tmp/zv/zero_vision), or config.model for a text policy")
        self.init_params, cfg = SFTStage._model_config(config)
        if not isinstance(cfg, K25Config):
            raise ValueError(f"config.init_from={config.get('init_from')!r} holds a text model: give its config as "
                             "config.model (the text rl stage) or start from a K2.5 run")
        chat = load_chat_format(config.rl.chat_format)
        self.multimodal = True
        self.model_cfg = with_chat_media_ids(cfg, chat)
        self.text_cfg = cfg.text_config
        self.tokenizer = chat.tokenizer
        self.pipeline = None
        self.mesh = make_mesh(config.mesh)
        self.dep = dep_enabled(config)
        per_row = int(config.data.max_media_tokens_per_row)
        vcfg = cfg.vision_config
        self.patch_budget, self.token_budget = vision_budgets(config, self.mesh, vcfg.merge_area, per_row)
        self.media = MediaStore({vision.SCHEME: vision.resolve}, patch_size=vcfg.patch_size,
                                merge_size=vcfg.merge_kernel_size[0])
        self._mm_loss = step_loss_fn(self._embeds_loss, self.mesh, dep=self.dep)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        if not self.multimodal:
            return super().build_model(rngs)
        model = K25Model(self.model_cfg, rngs=rngs)
        if self.init_params:
            copy_into(model, self.init_params, "config.init_from")
        return model

    def param_counts(self) -> dict[str, int]:
        return count_params(self.text_cfg)

    def step_config(self) -> StepConfig:
        if not self.multimodal:
            return super().step_config()
        return StepConfig.for_decoder(self.config, self.text_cfg, accum_steps=int(self.config.optim.accum_steps),
                                      multimodal=True)

    # ----------------------------------------------------------------------------------------- pieces
    def make_env(self) -> AgentEnv:
        v = self.rl.get("vision")
        if self.multimodal and v is not None and v.tool:  # the sandboxed Python tool, the task's images bound
            return AgentEnv(self.fmt, self.judge, max_turns=int(self.rl.max_turns),
                            tool_timeout_s=float(v.sandbox_timeout_s) + 5.0, max_tool_chars=int(v.max_tool_chars),
                            replay_tools=True, toolset_factory=vision.python_toolset(v),
                            tool_schemas=vision.TOOL_SCHEMAS, tool_images=int(v.tool_images))
        return AgentEnv(self.fmt, self.judge, None, max_turns=int(self.rl.max_turns))

    def task(self, index: int, seed: int) -> Task:
        """The `index`-th training task of the stream `seed` (deterministic: the checkpoint keeps a cursor)."""
        rng = np.random.default_rng([seed, index])
        name = list(self.sources)[int(rng.choice(len(self.sources), p=self.weights))]
        if vision.is_vision(name):
            return self.sources[name].rl_task(index, seed)
        return _task_to_rl(name, index, self.sources[name].example("train", index, stream=seed))

    def eval_tasks(self) -> list[Task]:
        n = int(self.config.eval_examples)
        out = []
        for name, src in self.sources.items():
            if vision.is_vision(name):
                out += src.eval_rl_tasks(n, int(self.config.seed))
            else:
                out += [_task_to_rl(f"eval/{name}", i, ex) for i, ex in enumerate(src.examples("eval", n))]
        return out

    def ensure_sampler(self, params: Any = None, buffers: Any = None):
        """The rollout sampler, built on first use around `params`/`buffers` (no initialisation of its own:
        the model's structure comes from `nnx.eval_shape`)."""
        if self.sampler is None:
            from k25.infer import Sampler

            if params is None:
                raise RuntimeError("the rl stage's sampler needs weights: the loop calls observe_state first")
            cfg, dtype = self.model_cfg, self.rl.sampler.dtype
            if dtype and self.multimodal:
                cfg = cfg.replace(text_config=dataclasses.replace(cfg.text_config, dtype=dtype, param_dtype=dtype))
            elif dtype:
                cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
            cls = K25Model if self.multimodal else K2Model
            abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
            model_def, p, b = split_model(abstract)
            cast = lambda tree, ref: jax.tree.map(lambda x, r: jnp.asarray(x, r.dtype), tree, ref)
            model = model_def.merge(cast(params, p), cast(buffers, b))
            max_len = self.config.seq_len + 1
            self.sampler = Sampler(model, max_slots=int(self.rl.sampler.max_slots), max_len=max_len,
                                   cache_dtype=jnp.dtype(self.rl.sampler.cache_dtype),
                                   min_bucket=min(int(self.rl.sampler.min_bucket), max_len),
                                   suppress_ids=self.suppressed_ids)
        return self.sampler

    def row_pixels(self, e: Episode, input_ids: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """(patches, grid) of a trajectory's images, checked against its placeholders and the row's cap."""
        px = self.media.pixels(e.media)
        tokens = sum(t * h * w for _, (t, h, w) in px) // self.model_cfg.vision_config.merge_area
        placed = int((np.asarray(input_ids) == self.model_cfg.image_token_id).sum())
        if tokens != placed:
            raise RuntimeError(f"episode {e.uid}: {len(px)} images make {tokens} vision tokens but the trajectory "
                               f"holds {placed} placeholders")
        cap = int(self.config.data.max_media_tokens_per_row)
        if tokens > cap:
            raise ValueError(f"episode {e.uid} holds {tokens} vision tokens > config.data.max_media_tokens_per_row="
                             f"{cap}; raise it or lower config.rl.vision.tool_images / max_tool_image_pixels")
        return px

    def push_weights(self, params: Any, buffers: Any, step: int | None = None) -> None:
        """Copy the trainer's weights into the sampler (a copy: the training step donates its state). With a
        `step` (rollouts, not evaluation) and `rl.sampler.weight_noise` > 0 the sampler gets perturbed weights
        (`k25.rl.weight_noise`): a controlled train/inference mismatch."""
        noise = float(self.rl.sampler.get("weight_noise", 0.0))
        if step is not None and noise:  # the perturbed weights are new arrays already: only the buffers need a copy
            params, buffers = perturb_weights(params, noise, int(self.config.seed), step), _copy(buffers)
        else:
            params, buffers = _copy((params, buffers))
        if self.sampler is None:
            self.ensure_sampler(params, buffers)
        else:
            self.sampler.update_weights(types.SimpleNamespace(params=params, buffers=buffers))

    # ------------------------------------------------------------------------------------- Stage API
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, self.config.seq_len)
        spec = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in BATCH_KEYS[:5]}
        if self.multimodal:  # the planned arrays of an image-free batch have the budgets' fixed shapes
            planned = self.plan({k: np.zeros(shape, np.int32) for k in BATCH_KEYS[:5]})
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in planned.items()}
        spec["old_logp"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        spec["advantages"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        spec["n_total"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return spec

    def plan(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Text arrays + pixels (HF layout) -> the planned batch of the multimodal step (fixed budgets)."""
        planned, _ = prepare_batch(raw, self.model_cfg, self.mesh, dep=self.dep,
                                   accum_steps=int(self.config.optim.accum_steps), patch_budget=self.patch_budget,
                                   token_budget=self.token_budget)
        return planned

    def loss_fn(self, model, batch):
        """Eq. 1 (or the configured baseline) summed over this (micro)batch's tokens, normalised by the whole
        batch's N; statistics are this microbatch's share of batch-level means, so they add up too. A K2.5
        policy's batch is planned: the encoder's tokens are spliced in before the decoder (DEP or not)."""
        if self.multimodal:
            return self._mm_loss(model, batch)
        out = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return self._policy_terms(out, batch)

    def _embeds_loss(self, language_model: K2Model, embeds: jax.Array, batch: dict):
        out = language_model(inputs_embeds=embeds, positions=batch["positions"], segment_ids=batch["segment_ids"])
        return self._policy_terms(out, batch)

    @property
    def suppressed_ids(self) -> tuple[int, ...]:
        """Ids the policy never samples: a K2.5 policy's media placeholders (only the processor inserts them;
        a sampled one could not be replayed through the vision path). The sampler and the loss both renormalise
        over the other ids, so π_old and π_θ are the same distribution."""
        return self.model_cfg.sampled_placeholder_ids

    def _policy_terms(self, out: Any, batch: dict):
        """(loss sum, aux) of Eq. 1 from the decoder's output on this batch."""
        logits = suppress_logits(out.logits.astype(jnp.float32), self.suppressed_ids)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        n_total = jnp.maximum(batch["n_total"][0], 1.0)
        n_micro = jnp.sum(mask)
        loss, stats = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, num_tokens=n_total,
                                  **self.loss_cfg.kwargs())
        share = n_micro / n_total
        if self.loss_cfg.normalization == "sequence":
            loss_sum = loss * n_micro
        else:
            loss_sum = loss * n_total
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        aux = {"num_tokens": n_micro, "max_attn_logits": out.max_attn_logits, "expert_counts": out.expert_counts,
               "masked_fraction": stats["masked_fraction"] * share,
               "mean_abs_log_ratio": stats["mean_abs_log_ratio"] * share,
               "max_abs_log_ratio": stats["max_abs_log_ratio"],
               "mean_ratio": stats["mean_ratio"] * share,
               "pg_loss": stats["pg_loss"] * (share if self.loss_cfg.normalization == "sequence" else 1.0),
               "tau_loss": stats["tau_loss"] * (share if self.loss_cfg.normalization == "sequence" else 1.0),
               "entropy": jnp.sum(entropy * mask) / n_total}
        return loss_sum, aux

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        if process_count != 1:
            raise ValueError("the rl stage samples in its own process; run it single-process (multi-host rollouts "
                             "go through k25.rl.rollout.EndpointPolicy samplers)")
        return RLIterator(self, seed)

    def run_once(self, tasks: list[Task], cfg: RolloutConfig, iteration: int = 0) -> IterationResult:
        """One rollout iteration of `tasks` on the sampler's current weights with its own manager and
        environments (no partial rollouts carried into training): held-out evaluation, Toggle's fit."""
        mgr = RolloutManager(SamplerPolicy(self.ensure_sampler(), self.media), EnvPool(self.make_env, len(tasks)),
                             cfg)
        return asyncio.run(mgr.run_iteration(tasks, iteration))

    def run_greedy(self, model: nnx.Module, tasks: list[Task]) -> IterationResult:
        """`tasks` once each, greedily, with `model`'s weights pushed to the sampler (held-out evaluation)."""
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        self.push_weights(nnx.to_pure_dict(params), nnx.to_pure_dict(buffers))
        turn = int(self.rl.sampler.eval_max_new_tokens)
        whole = int(self.rl.sampler.get("eval_max_response_tokens", 0)) or turn
        return self.run_once(tasks, dataclasses.replace(self.rollout_cfg, group_size=1, temperature=0.0,
                                                        tokens_per_iteration=whole, max_response_tokens=whole,
                                                        max_turn_tokens=turn))

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """Greedy held-out accuracy (`eval/accuracy`: mean reward over the eval tasks) with these weights."""
        tasks = self.eval_tasks()
        if not tasks:
            return {}
        res = self.run_greedy(model, tasks)
        eps = res.finished + res.carried  # a carried (cut-off) answer has not been judged: it counts as wrong
        rewards = [e.reward if e.status == "done" else 0.0 for e in eps]
        out = {"eval/accuracy": float(np.mean(rewards)) if eps else 0.0,
               "eval/response_length": float(np.mean([e.response_tokens for e in eps])) if eps else 0.0,
               "eval/tool_call_rate": float(np.mean([e.tool_calls > 0 for e in eps])) if eps else 0.0}
        solved = []
        for name, src in self.sources.items():
            mine = [(e, r) for e, r in zip(eps, rewards) if e.task["id"].startswith(f"eval/{name}:")]
            out[f"eval/{name}_accuracy"] = float(np.mean([r for _, r in mine])) if mine else 0.0
            if not mine or not (hasattr(src, "eval_metrics") or hasattr(src, "grade")):
                continue  # the reply text is only parsed for a task that scores it itself
            replies = [self.fmt.parse(e.ids[e.turn_start:]).get("content") or "" if e.status == "done" else ""
                       for e, _ in mine]
            if hasattr(src, "eval_metrics"):  # a task's own held-out figures (safety: refusal rates)
                metrics = src.eval_metrics([e.task["target"] for e, _ in mine], replies)
                out.update({f"eval/{k}": v for k, v in metrics.items()})
            if hasattr(src, "grade"):  # strict right/wrong beside a partial-credit reward (vision)
                grades = [src.grade(e.task, r) for (e, _), r in zip(mine, replies)]
                out[f"eval/{name}_solved"] = float(np.mean(grades))
                solved += grades
        if solved:
            out["eval/solved"] = float(np.mean(solved))
        v = self.rl.get("vision")
        if self.multimodal and v is not None and int(v.text_eval_per_task) > 0:  # the Table 2 analog
            if self._text_eval is None:
                self._text_eval = vision.TextHeldOut(v, self.model_cfg.vision_config.merge_area,
                                                     int(self.config.seed))
            out.update(self._text_eval(model))
        return out


class RLIterator:
    """The stage's data iterator: rollouts with the latest weights; JSON state for the checkpoint."""

    def __init__(self, stage: RLStage, seed: int):
        self.stage, self.seed = stage, seed
        self.cursor = 0  # training tasks drawn so far
        self.iteration = 0  # rollout iterations run
        self.version = 0  # trainer step whose weights the sampler holds
        self.buffer: list[list[Episode]] = []  # complete groups not yet trained on
        self.toggle = Toggle(stage.toggle_cfg)
        self.toggle_fitted = False  # a prompt pool's budgets, fitted once before the first step
        self.manager: RolloutManager | None = None
        self._manager_state: dict | None = None
        self._acc: dict[str, list[float]] = {}

    # -------------------------------------------------------------------------------- the loop's hooks
    def observe_state(self, state: Any, step: int) -> None:
        self.stage.push_weights(state.params, state.buffers, step=int(step))
        self.version = int(step)
        if self.manager is not None:
            self.manager.version = self.version

    def _ensure_manager(self) -> RolloutManager:
        if self.manager is None:
            st = self.stage
            self.manager = RolloutManager(SamplerPolicy(st.ensure_sampler(), st.media),
                                          EnvPool(st.make_env, st.config.batch_size * 4), st.rollout_cfg)
            if self._manager_state is not None:
                self.manager.load_state_dict(self._manager_state)
            self.manager.version = self.version
        return self.manager

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        st = self.stage
        rows = st.config.batch_size
        mgr = self._ensure_manager()
        prompts = rows // st.rl.group_size
        drop = bool(st.rl.get("drop_uniform_groups", False))
        cap = int(st.rl.get("max_iterations_per_step", 0)) if drop else 0
        iterations = dropped = 0
        pool = st.prompt_pool
        if pool and st.toggle_cfg.enabled and not self.toggle_fitted:
            self._fit_toggle()
        while sum(len(g) for g in self.buffer) < rows and not (cap and iterations >= cap):
            tasks = [st.task((self.cursor + i) % pool if pool else self.cursor + i, self.seed)
                     for i in range(prompts)]
            self.cursor += prompts
            res = asyncio.run(mgr.run_iteration(tasks, self.iteration))
            self.iteration += 1
            iterations += 1
            groups = res.groups
            if drop:
                groups = [g for g in res.groups if not self._uniform(g)]
                dropped += len(res.groups) - len(groups)
                # `reward` is then the kept groups' mean; this one is every completed group's, dropped or not
                self._add("reward_all_groups", [e.reward for g in res.groups for e in g])
            self.buffer += groups
            self._add("failed_episodes", [len(res.failed)])
            self._add("carried_episodes", [len(res.carried)])
        if drop:  # per step: groups dropped and rollout iterations it took to fill the batch
            self._add("dropped_uniform_groups", [dropped])
            self._add("rollout_iterations", [iterations])
        batch_groups, n = [], 0
        cfg = st.rollout_cfg
        while self.buffer and n + len(self.buffer[0]) <= rows:
            g = self.buffer.pop(0)
            oldest = min((e.oldest_version() for e in g if e.oldest_version() is not None), default=self.version)
            if cfg.stale == "restart" and self.version - oldest > cfg.max_staleness:
                self._add("dropped_stale_groups", [1])  # waited in the buffer too long: off-policy beyond k
                continue
            batch_groups.append(g)
            n += len(g)
        return self._batch(batch_groups)

    def _fit_toggle(self) -> None:
        """Toggle's budgets for every prompt of the pool from K responses of the current (starting) policy, each
        episode run to its end (no partial rollouts); these rollouts are not trained on."""
        st = self.stage
        pool = [st.task(i, self.seed) for i in range(st.prompt_pool)]
        cfg = dataclasses.replace(st.rollout_cfg, tokens_per_iteration=st.rollout_cfg.max_response_tokens)
        chunk = max(1, int(st.rl.sampler.max_slots) // cfg.group_size)
        groups: dict[str, tuple[list[float], list[int]]] = {}
        for n, start in enumerate(range(0, len(pool), chunk)):
            for g in st.run_once(pool[start:start + chunk], cfg, iteration=-1 - n).groups:
                groups[g[0].task["id"]] = ([e.reward for e in g], [e.response_tokens for e in g])
        self.toggle.fit(groups)
        self.toggle_fitted = True
        budgets = [b for b in self.toggle.budgets.values() if b is not None]
        self._add("toggle_fitted_prompts", [len(groups)])
        self._add("toggle_budgeted_prompts", [len(budgets)])
        if budgets:
            self._add("toggle_budget_mean", [float(np.mean(budgets))])

    def _uniform(self, group: list[Episode]) -> bool:
        """Whether the rewards a group's advantages come from (Toggle's at the current step) are all equal: then
        every advantage is zero and the group adds nothing to Eq. 1's gradient but its tokens to N."""
        shaped = self.toggle.apply(self.version, group[0].task["id"], [e.reward for e in group],
                                   [e.response_tokens for e in group])
        return bool(np.all(shaped == shaped[0]))

    def _batch(self, groups: list[list[Episode]]) -> dict:
        st = self.stage
        B, T = st.config.batch_size, st.config.seq_len
        out = {k: np.zeros((B,), np.float32) if k == "n_total" else
               np.zeros((B, T), np.float32 if k in ("old_logp", "advantages") else np.int32) for k in BATCH_KEYS}
        rewards, raw, lengths, calls, stale, judge_failed = [], [], [], [], [], []
        row = 0
        pixels: list[list[tuple[np.ndarray, tuple[int, int, int]]]] = [[] for _ in range(B)]
        for g in groups:
            r = [e.reward for e in g]
            n = [e.response_tokens for e in g]
            key = g[0].task["id"]
            shaped = self.toggle.apply(self.version, key, r, n)  # the identity when Toggle is off
            adv = group_advantages(shaped, np.zeros(len(g), np.int32), std_normalize=bool(st.rl.std_normalize))
            for e, a in zip(g, adv):
                full = e.prompt_ids + e.ids
                if len(full) - 1 > T:
                    raise ValueError(f"a trajectory has {len(full)} tokens (prompt {len(e.prompt_ids)} + response "
                                     f"{len(e.ids)}) but config.seq_len={T}; raise seq_len to at least prompt + "
                                     "config.rl.rollout.max_response_tokens")
                L = len(full) - 1
                mask = [0] * len(e.prompt_ids) + e.mask
                lps = [0.0] * len(e.prompt_ids) + e.logprobs
                out["input_ids"][row, :L] = full[:-1]
                out["targets"][row, :L] = full[1:]
                out["positions"][row, :L] = np.arange(L)
                out["segment_ids"][row, :L] = 1
                out["loss_mask"][row, :L] = mask[1:]
                out["old_logp"][row, :L] = lps[1:]
                out["advantages"][row, :L] = a * np.asarray(mask[1:], np.float32)
                if e.media:
                    pixels[row] = st.row_pixels(e, out["input_ids"][row])
                old = e.oldest_version()
                stale.append(self.version - old if old is not None else 0)
                row += 1
            rewards += list(shaped)
            raw += r
            lengths += n
            calls += [e.tool_calls for e in g]
            judge_failed += [float(bool(e.info.get("judge_failed"))) for e in g]
        out["n_total"][:] = out["loss_mask"].sum()
        if st.multimodal:  # the joint stage's planning; Eq. 1's arrays ride beside the text arrays
            text = stack_rows([({k: out[k][r] for k in BATCH_KEYS[:5]}, pixels[r]) for r in range(B)])
            out = {**st.plan(text), **{k: out[k] for k in BATCH_KEYS[5:]}}
        self._add("reward", raw)
        self._add("reward_shaped", rewards)
        self._add("response_length", lengths)
        self._add("tool_call_rate", [float(c > 0) for c in calls])
        self._add("judge_failed_rate", judge_failed)  # the judge's fallback stood in (rl.judge_fallback >= 0)
        self._add("tool_calls_per_episode", calls)
        self._add("staleness", stale)
        self._add("batch_fill", [row / B])
        return out

    def _add(self, key: str, values) -> None:
        self._acc.setdefault(key, []).extend(float(v) for v in values)

    def host_metrics(self) -> dict[str, float]:
        """Means since the last call of what the rollouts produced (the loop logs them with the step)."""
        out = {k: float(np.mean(v)) for k, v in self._acc.items() if v}
        if "staleness" in self._acc and self._acc["staleness"]:
            out["max_staleness"] = float(np.max(self._acc["staleness"]))
        out["toggle_phase"] = float(self.toggle.phase(self.version)) if self.stage.toggle_cfg.enabled else -1.0
        self._acc = {}
        return out

    # ------------------------------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        mgr = self.manager.state_dict() if self.manager is not None else self._manager_state
        return {"cursor": self.cursor, "iteration": self.iteration, "version": self.version,
                "buffer": [[dataclasses.asdict(e) for e in g] for g in self.buffer],
                "toggle": self.toggle.state_dict(), "toggle_fitted": self.toggle_fitted, "manager": mgr,
                "acc": self._acc}

    def set_state(self, state: dict[str, Any]) -> None:
        state = json.loads(json.dumps(state))  # a plain copy
        self.cursor, self.iteration, self.version = state["cursor"], state["iteration"], state["version"]
        self.buffer = [[Episode(**e) for e in g] for g in state["buffer"]]
        self.toggle = Toggle.from_state_dict(state["toggle"])
        self.toggle_fitted = bool(state.get("toggle_fitted", False))
        self._manager_state = state["manager"]
        self._acc = {k: list(v) for k, v in state.get("acc", {}).items()}
        if self.manager is not None and self._manager_state is not None:
            self.manager.load_state_dict(self._manager_state)
