"""The K2 text-model configuration: every architectural switch is a field here.

Field names follow transformers' `DeepseekV3Config` so that HF checkpoints map onto
them one to one; the few k25-only fields (dtypes, balancing rate) are documented inline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

EP_EXCHANGES = ("all_to_all", "ragged")  # K2Config.ep_exchange (k25/parallel/expert.py)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension, exactly the parameters transformers' DeepseekV3 reads.

    `factor` <= 1 (or `type == "default"`) disables YaRN and gives plain RoPE.
    """

    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # round the correction range to whole dimensions (transformers' default)

    @property
    def is_yarn(self) -> bool:
        return self.type == "yarn"


@dataclasses.dataclass(frozen=True)
class K2Config:
    """Kimi K2 / DeepSeek-V3 decoder: MLA attention, sigmoid-routed MoE, YaRN."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense SwiGLU layers
    moe_intermediate_size: int = 2048  # width of one routed (and shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1  # the first k layers are dense SwiGLU, the rest MoE
    num_attention_heads: int = 64
    # MLA
    q_lora_rank: int = 1536  # 0: plain query projection without a low-rank bottleneck
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # one rope key of this width, shared by all heads
    v_head_dim: int = 128
    # MoE routing
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step; 0 turns the bias update off
    grouped_gemm: str = "auto"  # expert compute: "ragged_dot", "blocked" (fast on CPU) or "auto" (by backend)
    moe_block_size: int = 128  # rows per block of the "blocked" grouped GEMM
    # k25 only, expert parallelism (k25/parallel/expert.py): 0 = dropless worst-case all-to-all buffer;
    # c > 0 = each (sender, receiver) rank pair gets C = ceil(c*t*k/ep) rows (t tokens per rank, rounded up to
    # a multiple of 8, at most the worst case t*min(k, E/ep)); assignments past a pair's C are dropped and
    # add nothing to their token's output, as in a capacity-limited MoE.
    ep_capacity_factor: float = 0.0
    # k25 only: the expert exchange, "all_to_all" (static per-pair buffers, every backend) or "ragged"
    # (jax.lax.ragged_all_to_all: only routed rows move; GPU/TPU, XLA:CPU cannot compile it). With "ragged",
    # ep_capacity_factor c > 0 bounds a rank's whole receive buffer to ceil(c*t*k) rows instead of per pair.
    ep_exchange: str = "all_to_all"
    # positions / norms
    rope_theta: float = 50000.0
    rope_scaling: RopeScaling = dataclasses.field(
        default_factory=lambda: RopeScaling(
            type="yarn", factor=32.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
        )
    )
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # k25 only: store the embedding table and LM head with the vocab dimension over every mesh axis instead of
    # replicated; the lookup and the loss head then work on vocab slices (k25/parallel/vocab.py)
    shard_vocab: bool = False
    initializer_range: float = 0.02
    # memory policy (k25 only): see k25/model/remat.py
    remat: str = "none"  # "none" | "selective" (the report's set) | "full"
    # keep saved residuals in pinned host memory: the 1F1B pipeline's residual slots (any backend with memory
    # kinds; accounted in the plan on XLA:CPU), and with "selective" unpipelined, the dot outputs (GPU/TPU)
    remat_offload: bool = False
    # k25 only: store each layer's 16-bit activation residuals in float8 e4m3 (per-row scale) for the backward
    fp8_activations: bool = False
    unroll_layers: bool = False  # k25 only: unroll the layer scans (faster small models; compile grows with depth)
    attention_chunk: int = 0  # query rows per attention block, recomputed in the backward; 0 = one (s, s) block
    # precision (k25 only)
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def sampled_placeholder_ids(self) -> tuple[int, ...]:
        """A text model has no media placeholders to keep out of samples (see K25Config's)."""
        return ()

    def replace(self, **kw: Any) -> K2Config:
        return dataclasses.replace(self, **kw)

    # --------------------------------------------------------------- validation
    def validate(self) -> K2Config:
        """Raise ValueError naming the field and the fix; return self when consistent."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"K2Config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive.")
        need(self.q_lora_rank >= 0, f"q_lora_rank={self.q_lora_rank} must be >= 0 (0 = plain query projection).")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs); use e.g. "
             f"{self.qk_rope_head_dim + 1}.")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers="
             f"{self.num_hidden_layers}].")
        if self.num_moe_layers > 0:
            need(self.n_routed_experts > 0, "n_routed_experts must be positive when there are MoE layers.")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                 f"{self.n_routed_experts}]; lower num_experts_per_tok or raise n_routed_experts.")
            need(self.n_group >= 1, f"n_group={self.n_group} must be >= 1 (1 disables group-limited routing).")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}; "
                 f"pick n_group among the divisors of n_routed_experts.")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}].")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2,
                     f"n_routed_experts/n_group={self.n_routed_experts // self.n_group} must be >= 2: a group is "
                     "scored by its two best experts; lower n_group.")
                per_group = self.n_routed_experts // self.n_group
                need(self.topk_group * per_group >= self.num_experts_per_tok,
                     f"topk_group*experts_per_group={self.topk_group * per_group} < num_experts_per_tok="
                     f"{self.num_experts_per_tok}: the chosen groups cannot hold top-k experts; raise topk_group.")
            need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0.")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive.")
            need(self.grouped_gemm in ("auto", "ragged_dot", "blocked"),
                 f"grouped_gemm={self.grouped_gemm!r} must be 'auto', 'ragged_dot' or 'blocked'.")
            need(self.moe_block_size > 0, f"moe_block_size={self.moe_block_size} must be positive.")
            need(self.ep_capacity_factor >= 0,
                 f"ep_capacity_factor={self.ep_capacity_factor} must be >= 0 (0 = dropless worst-case buffer).")
            need(self.ep_exchange in EP_EXCHANGES,
                 f"ep_exchange={self.ep_exchange!r} must be 'all_to_all' or 'ragged' (ragged_all_to_all, GPU/TPU).")
            need(self.bias_update_rate >= 0, f"bias_update_rate={self.bias_update_rate} must be >= 0 (0 = off).")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, "intermediate_size must be positive when there are dense layers.")
        need(self.remat in ("none", "selective", "full"),
             f"remat={self.remat!r} must be 'none', 'selective' or 'full'.")
        need(self.attention_chunk >= 0,
             f"attention_chunk={self.attention_chunk} must be >= 0 (0 = one (s, s) block; otherwise query rows "
             "per block).")
        rs = self.rope_scaling
        need(rs.type in ("default", "yarn"), f"rope_scaling.type={rs.type!r} must be 'default' or 'yarn'.")
        if rs.is_yarn:
            need(rs.factor >= 1.0, f"rope_scaling.factor={rs.factor} must be >= 1 for YaRN.")
            need(rs.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be > 0.")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"K2Config: {name}={getattr(self, name)!r} is not a dtype; use 'float32' or "
                                 "'bfloat16'.") from e
        return self

    # -------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> K2Config:
        """Build from a plain dict (an ml_collections ConfigDict `.to_dict()` or JSON); unknown keys are errors."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"K2Config: unknown field(s) {unknown}; valid fields are {sorted(fields)}.")
        if isinstance(d.get("rope_scaling"), dict):
            rs = dict(d["rope_scaling"])
            rfields = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rs) - rfields)
            if bad:
                raise ValueError(f"K2Config: unknown rope_scaling field(s) {bad}; valid: {sorted(rfields)}.")
            d["rope_scaling"] = RopeScaling(**rs)
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- presets
def k2_full() -> K2Config:
    """The published Kimi K2 shape (1.04T total, 32B activated parameters)."""
    return K2Config().validate()


def tiny(**overrides: Any) -> K2Config:
    """A few-million-parameter K2 that trains a step in well under a second on a CPU.

    Keeps every mechanism on: low-rank q, group-limited routing, a dense first layer,
    shared expert and YaRN.
    """
    cfg = K2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.827,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=256,
                                 mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=1024,
        dtype="float32",
    )
    return cfg.replace(**overrides).validate()


PRESETS = {"tiny": tiny, "k2_full": k2_full}
