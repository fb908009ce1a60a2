"""MoonViT-3D and multimodal (K2.5) configuration.

Field names follow transformers' `Kimi_K25VisionConfig` / `Kimi_K25Config` so HF configs map one to one.
Two HF fields are flattened: `rope_parameters["rope_theta"]` becomes `rope_theta` (the vision RoPE is always
axial), and the LayerNorm epsilon HF hard-codes (1e-5) becomes `layer_norm_eps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from k25.model.config import K2Config

# hidden_act values the vision MLP understands (transformers' ACT2FN names).
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu", "silu")


def _check_dtype(owner: str, name: str, value: str) -> None:
    try:
        jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{owner}: {name}={value!r} is not a dtype; use 'float32' or 'bfloat16'.") from e


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(fields)}.")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class MoonViTConfig:
    """MoonViT-3D: 14x14 patches, learned 2D position table + sin-cos time embedding, axial 2D RoPE."""

    patch_size: int = 14
    pos_emb_height: int = 64  # rows of the learned position table (resampled bicubically to each grid)
    pos_emb_width: int = 64
    pos_emb_time: int = 4  # frames per video chunk; rows of the fixed sin-cos time table
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    merge_kernel_size: tuple[int, int] = (2, 2)  # spatial patches merged into one LLM token
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_area(self) -> int:
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw: Any) -> MoonViTConfig:
        return dataclasses.replace(self, **kw)

    def validate(self) -> MoonViTConfig:
        """Raise ValueError naming the field and the fix; return self when consistent."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"MoonViTConfig: {msg}")

        for name in ("patch_size", "pos_emb_height", "pos_emb_width", "pos_emb_time", "num_attention_heads",
                     "num_hidden_layers", "hidden_size", "intermediate_size", "num_channels"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive.")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}.")
        need(self.head_dim % 4 == 0,
             f"head_dim=hidden_size/num_attention_heads={self.head_dim} must be divisible by 4: axial RoPE gives "
             "a quarter of the head to each of (h, w) x (cos half, sin half); change num_attention_heads.")
        need(self.hidden_size % 2 == 0, f"hidden_size={self.hidden_size} must be even for the sin-cos time table.")
        need(self.hidden_act in VISION_ACTIVATIONS,
             f"hidden_act={self.hidden_act!r} is not supported; use one of {VISION_ACTIVATIONS}.")
        need(len(self.merge_kernel_size) == 2 and all(k > 0 for k in self.merge_kernel_size),
             f"merge_kernel_size={self.merge_kernel_size} must be two positive ints, e.g. (2, 2).")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive.")
        need(self.layer_norm_eps > 0, f"layer_norm_eps={self.layer_norm_eps} must be positive.")
        _check_dtype("MoonViTConfig", "dtype", self.dtype)
        _check_dtype("MoonViTConfig", "param_dtype", self.param_dtype)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoonViTConfig:
        d = dict(d)
        if "merge_kernel_size" in d:
            d["merge_kernel_size"] = tuple(d["merge_kernel_size"])
        return _from_dict(cls, d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class K25Config:
    """K2.5 = MoonViT-3D + patch-merger projector + K2 decoder; media placeholders are replaced in order."""

    text_config: K2Config = dataclasses.field(default_factory=K2Config)
    vision_config: MoonViTConfig = dataclasses.field(default_factory=MoonViTConfig)
    projection_hidden_size: int = 1152  # width of the projector's pre-norm: the vision hidden size
    projection_layer_norm_eps: float = 1e-5
    image_token_id: int = 163605
    video_token_id: int = 163840
    vision_start_token_id: int = 163602
    vision_end_token_id: int = 163604

    def replace(self, **kw: Any) -> K25Config:
        return dataclasses.replace(self, **kw)

    @property
    def sampled_placeholder_ids(self) -> tuple[int, ...]:
        """The media placeholder ids a sampler could emit (those inside the text vocabulary; the released
        video id lies past it). Only the processor writes them: a sampled one would be a media slot with no
        media, so samplers suppress them."""
        ids = {self.image_token_id, self.video_token_id}
        return tuple(sorted(i for i in ids if i < self.text_config.vocab_size))

    def validate(self) -> K25Config:
        """Validate both towers and their junction; raise ValueError naming the field and the fix."""
        self.text_config.validate()
        self.vision_config.validate()
        vis = self.vision_config.hidden_size
        if self.projection_hidden_size != vis:
            raise ValueError(f"K25Config: projection_hidden_size={self.projection_hidden_size} must equal "
                             f"vision_config.hidden_size={vis} (the projector normalises vision features); "
                             f"set projection_hidden_size={vis}.")
        if self.projection_layer_norm_eps <= 0:
            raise ValueError(f"K25Config: projection_layer_norm_eps={self.projection_layer_norm_eps} must be > 0.")
        for name in ("image_token_id", "video_token_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"K25Config: {name}={getattr(self, name)} must be a non-negative token id.")
        if self.image_token_id == self.video_token_id:
            raise ValueError(f"K25Config: image_token_id and video_token_id are both {self.image_token_id}; "
                             "give videos their own placeholder id.")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> K25Config:
        d = dict(d)
        if isinstance(d.get("text_config"), dict):
            d["text_config"] = K2Config.from_dict(d["text_config"])
        if isinstance(d.get("vision_config"), dict):
            d["vision_config"] = MoonViTConfig.from_dict(d["vision_config"])
        return _from_dict(cls, d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tiny_vision(**overrides: Any) -> MoonViTConfig:
    """A MoonViT small enough for CPU unit tests (2 layers, width 32, 8x8 position table)."""
    cfg = MoonViTConfig(pos_emb_height=8, pos_emb_width=8, num_attention_heads=2, num_hidden_layers=2,
                        hidden_size=32, intermediate_size=48, dtype="float32")
    return cfg.replace(**overrides).validate()
