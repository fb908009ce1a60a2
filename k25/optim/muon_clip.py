"""MuonClip (Kimi K2): Muon with Moonlight's consistent-RMS scaling on every matrix, AdamW elsewhere, plus QK-Clip.

Parameter split (`label_params`), decided from the parameter paths and shapes, never from optax's default
2-D rule (which would send the embedding to Muon, leave the 3-D/4-D stacked kernels to Adam and use NAdamW):

* "muon": every weight matrix, i.e. every leaf whose *logical* rank is >= 2, where the leading `layers` axis of
  a stacked layer (a path through `dense_layers` / `moe_layers` / any key ending in "layers") does not count:
  the attention and MLP kernels (L, in, out), the router (L, D, E) and the routed experts (L, E, in, out).
  Newton-Schulz orthogonalises the last two axes (reduction = ndim-2, output = ndim-1); all leading axes
  (layers, experts) are batch, so each layer/expert matrix is orthogonalised on its own.
* "adamw": the token embedding, the LM head (Moonlight keeps both on AdamW: they are lookup tables / a
  classifier, not hidden linear maps), any other embedding table (a leaf whose name contains "embedding", e.g.
  MoonViT's position_embeddings), norm scales, biases and every other logical vector, with plain
  (non-Nesterov) AdamW at the same learning rate and weight decay.
Paths are matched by suffix, so the K2.5 tree (`language_model/...`, `vision_tower/...`) is labelled the same way.

Freezing (`trainable`): leaves outside the given path prefixes are labelled "frozen" and get
`optax.set_to_zero()` updates (no state, no weight decay), so they stay bit-for-bit unchanged; this is how a
stage trains only part of a model (e.g. K2.5's projector-only alignment) without a second optimizer.

The routing correction bias (`ExpertBias`) is not an `nnx.Param`, so it is absent from
`nnx.to_pure_dict(nnx.state(model, nnx.Param))`; `label_params` refuses a tree that contains it.

Muon update per matrix W (A x B = fan_in x fan_out):
    W <- W - lr * (rms_scale * sqrt(max(A, B)) * NS5(nesterov_momentum(G)) + weight_decay * W)
Moonlight's "consistent RMS" factor 0.2*sqrt(max(A, B)) makes the update RMS match AdamW's (~0.2), so both
groups can share one learning rate and weight decay. optax 0.2.8 implements exactly this factor as
`consistent_rms`, but only inside `optax.contrib.muon` (whose non-Muon branch is a NAdamW tied to Muon's
`nesterov` flag) or the private `optax.contrib._muon.scale_by_shape`; so we apply the same one-line scale here
(`scale_by_consistent_rms`) on top of `scale_by_batched_muon` (optax's Muon step, vmapped per matrix so that
sharded batch axes stay sharded; see its docstring). The tests check the Muon branch
against `optax.contrib.muon(consistent_rms=...)` leaf for leaf.

QK-Clip (`qk_clip`) runs on the weights *after* the optimizer step: for every head whose max pre-softmax logit
S of the last forward exceeds tau, it rescales that head's query/key weights by gamma = tau / S so that the same
input would give max logit tau: q_nope and k_nope columns by sqrt(gamma), q_rope columns by gamma. The rope key
is shared by all heads (kv_a_proj_with_mqa), so it is never touched; V columns are never touched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, MuonState, scale_by_muon

from k25.model.config import K2Config

MUON = "muon"
ADAMW = "adamw"
FROZEN = "frozen"
# Full-rank leaves that still belong to AdamW: the input embedding table and the output classifier.
ADAMW_PATHS = ("embed_tokens/embedding", "lm_head/kernel")
# Leaf names that are vectors however they are stacked.
ADAMW_LEAF_NAMES = ("scale", "bias")
STACKS = ("dense_layers", "moe_layers")  # decoder stacks in layer order (see k25.model.decoder.K2Model)


# ----------------------------------------------------------------------------------------------- labels
def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(_key_name(k) for k in path)


def _is_stacked(parts: list[str]) -> bool:
    """True when the leaf lives in a layer stack, whose leading axis is `layers` (not a matrix axis)."""
    return any(p.endswith("layers") for p in parts[:-1])


def _label(path: tuple[Any, ...], x: Any) -> str:
    name = _path_str(path)
    parts = name.split("/")
    if name.endswith("mlp/bias"):
        raise ValueError(f"label_params: {name!r} looks like the MoE routing bias (ExpertBias); it is updated by "
                         "the balancing rule, not the optimizer. Pass nnx.to_pure_dict(nnx.state(model, nnx.Param)).")
    logical_ndim = len(x.shape) - (1 if _is_stacked(parts) else 0)
    if (any(name == p or name.endswith("/" + p) for p in ADAMW_PATHS) or parts[-1] in ADAMW_LEAF_NAMES
            or "embedding" in parts[-1] or logical_ndim < 2):
        return ADAMW
    return MUON


def label_params(params: Any, trainable: Sequence[str] = ()) -> Any:
    """Pytree of "muon" / "adamw", one per leaf of `params` (arrays or anything with `.shape`).

    `trainable`: path prefixes ("mm_projector", "vision_tower/layers"); when given, every leaf under none
    of them is labelled "frozen". Empty: everything trains.
    """
    prefixes = tuple(p.strip("/") for p in trainable)

    def label(path: tuple[Any, ...], x: Any) -> str:
        name = _path_str(path)
        if prefixes and not any(name == p or name.startswith(p + "/") for p in prefixes):
            return FROZEN
        return _label(path, x)

    labels = jax.tree_util.tree_map_with_path(label, params)
    if prefixes and all(v == FROZEN for v in jax.tree.leaves(labels)):
        raise ValueError(f"trainable={list(trainable)} matches no parameter; prefixes are '/'-joined paths of the "
                         "param dict, e.g. 'mm_projector' or 'vision_tower/layers'.")
    return labels


def _partition(branches: dict[str, optax.GradientTransformation], labels: Any) -> optax.GradientTransformation:
    """optax.partition of `branches`, plus set_to_zero for frozen leaves when there are any."""
    if FROZEN in jax.tree.leaves(labels):
        branches = {**branches, FROZEN: optax.set_to_zero()}
    return optax.partition(branches, labels)


def _muon_dim_numbers(updates: Any) -> Any:
    """Orthogonalise over the last two axes; every leading axis (layers, experts) is a batch axis."""
    return jax.tree.map(lambda u: MuonDimensionNumbers(reduction_axis=u.ndim - 2, output_axis=u.ndim - 1), updates)


# -------------------------------------------------------------------------------------------- transforms
def _newton_schulz(x: jnp.ndarray, coeffs: jnp.ndarray, steps: int, eps: float) -> jnp.ndarray:
    """optax's quintic Newton-Schulz with Frobenius preconditioning, on one 2-D matrix.

    optax transposes a tall matrix, iterates on the wide one and transposes back; the same iteration on
    the tall matrix with its Gram matrix on the other side, X <- aX + X(bA + cA^2) with A = X^T X, is that
    exactly (f(X^T)^T = f(X)) without materialising two transposes of every matrix.
    """
    x = x / (jnp.linalg.norm(x) + eps)
    c = coeffs.astype(x.dtype)
    tall = x.shape[0] > x.shape[1]
    for _ in range(steps):
        if tall:
            a = jnp.einsum("ij,ik->jk", x, x)
            x = c[0] * x + x @ (c[1] * a + c[2] * a @ a)
        else:
            a = jnp.einsum("ij,kj->ik", x, x)
            x = c[0] * x + (c[1] * a + c[2] * a @ a) @ x
    return x


# A stack of single matrices per layer is orthogonalised all at once while its f32 Gram matrices together fit in
# this many bytes (the toy and mid-size models: one batched matmul per step), else layer by layer.
GRAM_BUDGET_BYTES = 1 << 30


def scale_by_batched_muon(ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8, nesterov: bool = True,
                          mu_dtype: Any = None) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon` for leaves whose last two axes are the matrix and whose leading axes
    (layers, experts) are batch axes, orthogonalised under one `vmap` per batch axis.

    Same momentum, bias correction, Nesterov term and Newton-Schulz as optax (the tests compare leaf for
    leaf), and the same `MuonState`, so checkpoints and the ZeRO-1 rules see the same tree. The difference
    is the batch handling: optax reshapes all batch axes into one before its vmap. Under ZeRO-1 the expert
    axis lies on `ep` (and the layer axis on `dp`); an axis merged from (layers, experts) whose minor part
    is sharded is no longer a block per device, so XLA all-gathers the whole stack first (the K2 plan had
    f32[11520, 2048, 7168] = 676 GB buffers per device). Nested vmaps leave every batch axis, and its
    sharding, where it is; the layer axis of an expert stack is scanned (`_layer_by_layer`) so that only
    one layer's Gram matrices are live, and so is that of a stack of single matrices whose f32 Grams together
    pass `GRAM_BUDGET_BYTES` (K2's attention output projections: 30 x 7168^2 = 6.2 GB per Gram per device).
    `mu_dtype` stores the momentum in that dtype (optax's option: the step computes in the gradients' dtype
    and rounds the new momentum once when it stores it); None keeps the parameters' dtype.
    """
    base = scale_by_muon(ns_steps=ns_steps, beta=beta, eps=eps, nesterov=nesterov,
                         weight_dimension_numbers=_muon_dim_numbers, mu_dtype=mu_dtype)

    def orthogonalize(x: jnp.ndarray, coeffs: jnp.ndarray) -> jnp.ndarray:
        f = functools.partial(_newton_schulz, coeffs=coeffs, steps=ns_steps, eps=eps)
        for _ in range(max(x.ndim - 3, 0)):  # the expert axis (and any other inner batch axis)
            f = jax.vmap(f)
        if x.ndim == 2:
            return f(x)
        if x.ndim == 3 and x.shape[0] * min(x.shape[1:]) ** 2 * 4 <= GRAM_BUDGET_BYTES:
            return jax.vmap(f)(x)  # a stack of single matrices whose Grams are small together: one batched step
        return _layer_by_layer(f, x)

    return optax.GradientTransformation(base.init, _muon_update(orthogonalize, beta, nesterov, mu_dtype))


def _layer_by_layer(f: Any, x: jnp.ndarray) -> jnp.ndarray:
    """f (one layer's matrix or experts) over a (layers, [experts,] m, n) stack, a layer group at a time.

    A vmap over every layer keeps every layer's Gram matrices live at once (f32 (30, 24, 2048, 2048) = 12 GB
    per device in the K2 plan). `lax.map` over the layers keeps one step's. ZeRO-1 puts the stack's layer
    axis on `dp` (k25.parallel.zero) in contiguous blocks, so the layers are split (g, L/g) with g = the
    dp shards that divide L, vmapped over g (each shard keeps its own block) and scanned over L/g: each
    step orthogonalises one local layer per device, with no gather.

    The loop writes each result over its own input slot (a `fori_loop` whose carry starts as the stack)
    rather than stacking `lax.map` outputs: `lax.map` needs a zero-filled output stack, which XLA:CPU
    created at the start of the K2 layout's step and kept through the whole gradient accumulation (7.9 GB per
    device for the three expert stacks). Slot i is read before it is written and written once: equal results.
    """
    mesh = jax.sharding.get_abstract_mesh()
    dp = mesh.shape["dp"] if not mesh.empty and "dp" in mesh.axis_names else 1
    g = math.gcd(x.shape[0], dp)
    xs = jnp.swapaxes(x.reshape(g, x.shape[0] // g, *x.shape[1:]), 0, 1)  # (L/g, g, E, m, n)
    vf = jax.vmap(f)
    one = jax.eval_shape(vf, xs[0])
    if (one.shape, one.dtype) == (xs.shape[1:], xs.dtype):
        out = jax.lax.fori_loop(0, xs.shape[0], lambda i, o: o.at[i].set(vf(o[i])), xs)
    else:
        out = jax.lax.map(vf, xs)
    return jnp.swapaxes(out, 0, 1).reshape(x.shape)


def _muon_update(orthogonalize: Any, beta: float, nesterov: bool, mu_dtype: Any = None) -> Any:
    """optax's Muon update (momentum, bias correction, Nesterov) with `orthogonalize(x, ns_coeffs)`."""

    def update_fn(updates: Any, state: MuonState, params: Any = None) -> tuple[Any, MuonState]:
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                                  optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                                  optax.tree.bias_correction(updates, beta, count))
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        out = jax.tree.map(lambda x: orthogonalize(x, state.ns_coeffs), mu_hat)
        return out, MuonState(count=count, mu=optax.tree.cast(mu, mu_dtype), ns_coeffs=state.ns_coeffs)

    return update_fn


def scale_by_consistent_rms(rms_scale: float = 0.2) -> optax.GradientTransformation:
    """Moonlight's consistent-RMS factor rms_scale*sqrt(max(A, B)) on the last two axes (A, B) of each update.

    An orthogonalised A x B matrix has RMS 1/sqrt(max(A, B)), so this gives every matrix update RMS ~rms_scale,
    matching AdamW's typical update RMS; equal to optax's `consistent_rms` for our dimension numbers.
    """

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        scaled = jax.tree.map(lambda u: u * (rms_scale * math.sqrt(max(u.shape[-2], u.shape[-1]))), updates)
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adamw(params: Any = None, *, learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.1,
          b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, trainable: Sequence[str] = ()
          ) -> optax.GradientTransformation:
    """Plain (non-Nesterov) AdamW on every parameter: the baseline MuonClip is benchmarked against.

    `params` is only needed with `trainable` (path prefixes; every other leaf is frozen).
    """
    tx = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, nesterov=False)
    if not trainable:
        return tx
    labels = jax.tree.map(lambda lab: ADAMW if lab != FROZEN else FROZEN, label_params(params, trainable))
    return _partition({ADAMW: tx}, labels)


def muon_clip(params: Any, *, learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.1, b1: float = 0.9,
              b2: float = 0.95, eps: float = 1e-8, muon_momentum: float = 0.95, nesterov: bool = True,
              ns_steps: int = 5, rms_scale: float = 0.2, trainable: Sequence[str] = (), muon_mu_dtype: Any = None
              ) -> optax.GradientTransformation:
    """The MuonClip optimizer update (QK-Clip itself is `qk_clip`, applied to the weights after this update).

    `params`: the pure param dict (or its shapes) the optimizer will be used on; the Muon/AdamW labels are
    computed from it once, so `init`/`update` must receive trees of the same structure, and `update` needs
    `params` (for the weight decay).
    Muon leaves: Nesterov momentum -> Newton-Schulz (ns_steps, optax's quintic coefficients) per matrix ->
    consistent-RMS scale -> decoupled weight decay -> -lr. AdamW leaves: optax.adamw(b1, b2, eps, weight_decay).
    `trainable`: path prefixes that train; every other leaf is frozen (see `label_params`). Empty: all train.
    `muon_mu_dtype`: the Muon momentum's storage dtype (None: the parameters').
    """
    labels = label_params(params, trainable)
    muon_branch = optax.chain(
        scale_by_batched_muon(ns_steps=ns_steps, beta=muon_momentum, eps=eps, nesterov=nesterov,
                              mu_dtype=muon_mu_dtype),
        scale_by_consistent_rms(rms_scale),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw_branch = adamw(learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps)
    return _partition({MUON: muon_branch, ADAMW: adamw_branch}, labels)


# ---------------------------------------------------------------------------------------------- NS FLOPs
def ns_flops(params_shapes: Any, ns_steps: int = 5) -> int:
    """Matmul FLOPs of the Newton-Schulz iterations of one Muon step, from shapes only.

    Per matrix with smaller dim m and larger dim n (optax transposes so X is m x n), one quintic iteration
    computes A = X X^T (2 m^2 n), A A (2 m^3) and (b A + c A A) X (2 m^2 n); elementwise terms are ignored.
    Every batched matrix (layer, expert) counts once. `params_shapes`: arrays or jax.ShapeDtypeStruct leaves.
    """
    total = 0
    for label, x in zip(jax.tree.leaves(label_params(params_shapes)), jax.tree.leaves(params_shapes), strict=True):
        if label != MUON:
            continue
        shape = tuple(x.shape)
        batch = math.prod(shape[:-2])
        m, n = sorted(shape[-2:])
        total += batch * ns_steps * (4 * m * m * n + 2 * m ** 3)
    return int(total)


# ----------------------------------------------------------------------------------------------- QK-Clip
def _clip_stack(layer: dict[str, Any], s: jnp.ndarray, cfg: K2Config, tau: float | jnp.ndarray
                ) -> tuple[dict[str, Any], jnp.ndarray]:
    """QK-Clip one layer stack given its max logits s (L, H); returns (new stack dict, clipped mask (L, H))."""
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    s = s.astype(jnp.float32)
    clipped = s > tau
    gamma = jnp.where(clipped, tau / jnp.where(clipped, s, 1.0), 1.0)  # (L, H); 1 where not clipped
    root = jnp.sqrt(gamma)
    L = s.shape[0]

    def per_column(parts: list[tuple[jnp.ndarray, int]]) -> jnp.ndarray:
        """(L, 1, H * sum(widths)) column factors: for each head, each factor repeated over its width."""
        cols = [jnp.broadcast_to(f[:, :, None], (L, H, w)) for f, w in parts]
        return jnp.concatenate(cols, axis=-1).reshape(L, 1, -1)

    attn = dict(layer["self_attn"])
    q_name = "q_b_proj" if cfg.q_lora_rank > 0 else "q_proj"
    q_scale = per_column([(root, dn), (gamma, dr)])
    kv_scale = per_column([(root, dn), (jnp.ones_like(gamma), dv)])
    for name, scale in ((q_name, q_scale), ("kv_b_proj", kv_scale)):
        w = attn[name]["kernel"]
        if w.shape[0] != L or w.shape[-1] != scale.shape[-1]:
            raise ValueError(f"qk_clip: {name}/kernel has shape {w.shape}, expected ({L}, in, {scale.shape[-1]}) "
                             "from the config; does the config match the params?")
        attn[name] = {**attn[name], "kernel": (w.astype(jnp.float32) * scale).astype(w.dtype)}
    return {**layer, "self_attn": attn}, clipped


def qk_clip(params: dict[str, Any], max_attn_logits: jnp.ndarray, cfg: K2Config, tau: float | jnp.ndarray = 100.0
            ) -> tuple[dict[str, Any], jnp.ndarray]:
    """Rescale each attention head whose max logit exceeds tau so that its max logit would be exactly tau.

    params: the K2 decoder's pure param dict (for a K2.5 model, its `language_model` subtree);
    max_attn_logits (num_hidden_layers, heads) from `K2Model.__call__` (dense rows first).
    Returns (new params, number of clipped heads as an int32 scalar). Jit-able with `cfg` static; heads with
    S <= tau (or NaN) are multiplied by exactly 1.
    """
    H, k = cfg.num_attention_heads, cfg.first_k_dense_replace
    if max_attn_logits.shape != (cfg.num_hidden_layers, H):
        raise ValueError(f"qk_clip: max_attn_logits has shape {max_attn_logits.shape}, expected "
                         f"(num_hidden_layers, heads) = ({cfg.num_hidden_layers}, {H}).")
    rows = {"dense_layers": max_attn_logits[:k], "moe_layers": max_attn_logits[k:]}
    new = dict(params)
    count = jnp.zeros((), jnp.int32)
    for stack in STACKS:
        if rows[stack].shape[0] == 0:
            continue
        if stack not in params:
            raise ValueError(f"qk_clip: the config has {rows[stack].shape[0]} {stack} but params has no {stack!r}.")
        new[stack], clipped = _clip_stack(params[stack], rows[stack], cfg, tau)
        count = count + clipped.sum(dtype=jnp.int32)
    return new, count
