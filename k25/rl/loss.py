"""The K2.5 policy loss (Eq. 1 of the report) and the baselines it is compared against.

Eq. 1, per prompt x with K responses y_j sampled from pi_old, maximises

    1/N sum_j sum_i  Clip(pi_theta/pi_old, alpha, beta) * (r(x, y_j) - mean_k r(x, y_k))
                     - tau * (log pi_theta/pi_old)^2

where N is the number of response tokens in the batch and pi_old is the log-probability the *sampler*
recorded when it generated the token. `Clip` is a gradient mask: a token whose ratio leaves the window
contributes no policy gradient, whatever the advantage's sign (unlike PPO's one-sided clip). The seeds leave
two things open, both config fields here (defaults argued in BUILD_NOTES.md, "RL"):

- `window`: the equation clips the ratio with alpha, beta > 0 ("ratio", the default: alpha < 1 < beta);
  the text speaks of log-ratios in [alpha, beta] ("log_ratio": alpha < 0 < beta).
- `tau_on_masked`: whether a token outside the window keeps its tau term (default True, as the equation
  reads: the penalty sits outside Clip).

Comparison switches (`correction`): "ppo" (PPO's pessimistic clip of the ratio to pi_old), "tis" (truncated
importance sampling of the trainer/sampler mismatch), "icepop" (IcePop's two-sided mismatch mask) and
"none" (policy gradient that ignores the sampler's logprobs). GRPO's std-normalised advantages are a switch of
`group_advantages`; its per-sequence averaging is `normalization="sequence"`.

The loss is the quantity to *minimise*, i.e. minus the objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CORRECTIONS = ("k25", "ppo", "tis", "icepop", "none")
WINDOWS = ("ratio", "log_ratio")
NORMALIZATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Every knob of `policy_loss`; `policy_loss(..., **cfg.kwargs())` applies it.

    alpha, beta: Eq. 1's window (on the ratio by default; see `window`).
    tau: weight of the squared log-ratio penalty (0 switches it off).
    correction: "k25" (Eq. 1) | "ppo" | "tis" | "icepop" | "none".
    window: "ratio" (alpha < 1 < beta bound pi_theta/pi_old) | "log_ratio" (alpha < 0 < beta bound the log).
    tau_on_masked: a token outside Eq. 1's window keeps its tau gradient (as written) or loses it too
      ("k25" only; the baselines always keep it, and tau=0 is their usual setting).
    normalization: "token" (Eq. 1: sum over tokens / N) | "sequence" (GRPO: mean per response, then mean
      over responses; `num_tokens` is then unused).
    ppo_eps_low/high: PPO's clip range [1 - eps_low, 1 + eps_high] on pi_theta/pi_old.
    tis_cap: TIS truncates the mismatch weight pi_prox/pi_old at this value.
    icepop_low/high: IcePop keeps a token only if pi_prox/pi_old lies in [low, high] (its paper's 0.5, 5).
    """

    alpha: float = 0.5
    beta: float = 2.0
    tau: float = 0.01
    correction: str = "k25"
    window: str = "ratio"
    tau_on_masked: bool = True
    normalization: str = "token"
    ppo_eps_low: float = 0.2
    ppo_eps_high: float = 0.2
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0

    def __post_init__(self) -> None:
        validate(**dataclasses.asdict(self))

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PolicyLossConfig:
        """From a dict or an ml_collections ConfigDict (unknown keys are an error naming them)."""
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"rl loss config: unknown field(s) {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**cfg)


def validate(*, alpha: float, beta: float, tau: float, correction: str = "k25", window: str = "ratio",
             tau_on_masked: bool = True, normalization: str = "token", ppo_eps_low: float = 0.2,
             ppo_eps_high: float = 0.2, tis_cap: float = 2.0, icepop_low: float = 0.5,
             icepop_high: float = 5.0) -> None:
    """Raise a ValueError naming the field for any setting that cannot be meant."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r}: expected one of {CORRECTIONS}")
    if window not in WINDOWS:
        raise ValueError(f"window={window!r}: expected one of {WINDOWS}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    if window == "ratio" and not 0.0 < alpha < 1.0 < beta:
        raise ValueError(f"alpha={alpha}, beta={beta}: with window='ratio' the window bounds pi_theta/pi_old and "
                         "must hold the on-policy ratio 1 (0 < alpha < 1 < beta, e.g. 0.5, 2.0); for bounds on "
                         "the log-ratio set window='log_ratio'")
    if window == "log_ratio" and not alpha < 0.0 < beta:
        raise ValueError(f"alpha={alpha}, beta={beta}: with window='log_ratio' the window bounds log(pi_theta/"
                         "pi_old) and must hold 0 (alpha < 0 < beta, e.g. -0.7, 0.7)")
    if tau < 0:
        raise ValueError(f"tau={tau}: must be >= 0 (0 switches the squared log-ratio penalty off)")
    if not (0 <= ppo_eps_low < 1 and ppo_eps_high >= 0):
        raise ValueError(f"ppo_eps_low={ppo_eps_low}, ppo_eps_high={ppo_eps_high}: need 0 <= eps_low < 1, "
                         "eps_high >= 0")
    if not tis_cap >= 1.0:
        raise ValueError(f"tis_cap={tis_cap}: must be >= 1 (the cap on pi_prox/pi_old)")
    if not 0.0 < icepop_low < 1.0 < icepop_high:
        raise ValueError(f"icepop_low={icepop_low}, icepop_high={icepop_high}: need 0 < low < 1 < high")


def _as_2d(name: str, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}; expected {shape} (batch, time) like logp")
    return x


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                alpha: float, beta: float, tau: float, correction: str = "k25", window: str = "ratio",
                tau_on_masked: bool = True, normalization: str = "token", ppo_eps_low: float = 0.2,
                ppo_eps_high: float = 0.2, tis_cap: float = 2.0, icepop_low: float = 0.5,
                icepop_high: float = 5.0, num_tokens: jax.Array | float | None = None,
                prox_logp: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 1 (or a baseline) as a scalar loss to minimise, plus diagnostics.

    Args:
      logp: (batch, time) log pi_theta of each response token (differentiated).
      old_logp: (batch, time) the sampler's recorded log pi_old of the same tokens.
      advantages: (batch,) one advantage per response (Eq. 1: r - group mean; see `group_advantages`),
        broadcast over its tokens; or (batch, time) per-token advantages.
      mask: (batch, time) 1 on tokens the policy generated, 0 on prompt, tool/environment and padding tokens.
      alpha, beta, tau, correction, ...: see `PolicyLossConfig`.
      num_tokens: N, the number of response tokens the loss is normalised by; default mask.sum(). Pass the
        whole batch's count when this call sees one microbatch or one data-parallel shard of it.
      prox_logp: (batch, time) the *trainer's* logprob under the old parameters (TIS/IcePop's mismatch
        weight pi_prox/pi_old and their PPO ratio's denominator; "none"'s baseline). Default
        stop_gradient(logp), exact when each batch is used for one optimizer step.

    Returns:
      (loss, stats): stats holds `masked_fraction` (share of response tokens whose policy-gradient term gets
      no gradient: outside the window, clipped, masked by IcePop or truncated by TIS), `mean_abs_log_ratio`,
      `max_abs_log_ratio`, `mean_ratio`, `pg_loss`, `tau_loss`, `num_tokens`.
    """
    validate(alpha=alpha, beta=beta, tau=tau, correction=correction, window=window, normalization=normalization,
             ppo_eps_low=ppo_eps_low, ppo_eps_high=ppo_eps_high, tis_cap=tis_cap, icepop_low=icepop_low,
             icepop_high=icepop_high)
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"logp has shape {logp.shape}; expected (batch, time)")
    old_logp = _as_2d("old_logp", old_logp, logp.shape)
    mask = _as_2d("mask", mask, logp.shape).astype(logp.dtype)
    advantages = jnp.asarray(advantages, logp.dtype)
    if advantages.shape == logp.shape[:1]:
        advantages = jnp.broadcast_to(advantages[:, None], logp.shape)
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages has shape {advantages.shape}; expected ({logp.shape[0]},) per response "
                         f"or {logp.shape} per token")
    on = mask > 0
    # Zero the log-ratio off the response *before* exp: padding logprobs may be -inf or garbage, and a NaN
    # in an unselected jnp.where branch still poisons the gradient.
    log_ratio = jnp.where(on, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(on, advantages, 0.0)
    if prox_logp is None:
        prox = jax.lax.stop_gradient(logp)
    else:
        prox = jax.lax.stop_gradient(_as_2d("prox_logp", prox_logp, logp.shape))
    prox_log_ratio = jnp.where(on, logp - prox, 0.0)  # pi_theta / pi_prox
    mismatch = jax.lax.stop_gradient(jnp.exp(jnp.where(on, prox - old_logp, 0.0)))  # pi_prox / pi_old

    if correction == "k25":
        lo, hi = (alpha, beta) if window == "ratio" else (float(np.exp(alpha)), float(np.exp(beta)))
        inside = (ratio >= lo) & (ratio <= hi)
        # Clip(ratio, alpha, beta): the ratio inside the window, the (constant) bound outside it, so the
        # value is Eq. 1's and an outside token has no policy gradient whatever the advantage's sign.
        clipped = jnp.where(inside, ratio, jax.lax.stop_gradient(jnp.clip(ratio, lo, hi)))
        pg = clipped * adv
        no_grad = ~inside
    elif correction == "ppo":
        lo, hi = 1.0 - ppo_eps_low, 1.0 + ppo_eps_high
        pg, no_grad = _ppo(ratio, adv, lo, hi)
    elif correction in ("tis", "icepop"):
        r = jnp.exp(prox_log_ratio)
        pg, no_grad = _ppo(r, adv, 1.0 - ppo_eps_low, 1.0 + ppo_eps_high)
        if correction == "tis":
            weight = jnp.minimum(mismatch, tis_cap)
            no_grad = no_grad | (mismatch > tis_cap)  # truncated rather than zeroed: counted as corrected
        else:
            keep = (mismatch >= icepop_low) & (mismatch <= icepop_high)
            weight = jnp.where(keep, mismatch, 0.0)
            no_grad = no_grad | ~keep
        pg = weight * pg
    else:  # "none": the trainer's own policy gradient, blind to where the tokens were sampled
        pg = jnp.exp(prox_log_ratio) * adv
        no_grad = jnp.zeros_like(on)

    penalty = tau * jnp.square(log_ratio)
    if not tau_on_masked and correction == "k25":
        penalty = jnp.where(no_grad, jax.lax.stop_gradient(penalty), penalty)
    per_token = jnp.where(on, pg - penalty, 0.0)  # the objective's summand

    n_resp = jnp.sum(mask)
    if normalization == "token":
        denom = n_resp if num_tokens is None else jnp.asarray(num_tokens, logp.dtype)
        denom = jnp.maximum(denom, 1.0)
        objective = jnp.sum(per_token) / denom
        pg_part = jnp.sum(jnp.where(on, pg, 0.0)) / denom
        tau_part = jnp.sum(jnp.where(on, penalty, 0.0)) / denom
    else:
        lengths = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        n_seq = jnp.maximum(jnp.sum(jnp.sum(mask, axis=1) > 0), 1)
        seq_mean = lambda v: jnp.sum(jnp.sum(jnp.where(on, v, 0.0), axis=1) / lengths) / n_seq
        objective, pg_part, tau_part = seq_mean(pg - penalty), seq_mean(pg), seq_mean(penalty)
        denom = n_resp

    count = jnp.maximum(n_resp, 1.0)
    abs_lr = jnp.abs(jax.lax.stop_gradient(log_ratio))
    stats = {
        "masked_fraction": jnp.sum(jnp.where(on, no_grad, False)) / count,
        "mean_abs_log_ratio": jnp.sum(abs_lr) / count,
        "max_abs_log_ratio": jnp.max(abs_lr),
        "mean_ratio": jnp.sum(jnp.where(on, jax.lax.stop_gradient(ratio), 0.0)) / count,
        "pg_loss": -jax.lax.stop_gradient(pg_part),
        "tau_loss": jax.lax.stop_gradient(tau_part),
        "num_tokens": jnp.asarray(denom, logp.dtype),
    }
    return -objective, stats


def _ppo(ratio: jax.Array, adv: jax.Array, lo: float, hi: float) -> tuple[jax.Array, jax.Array]:
    """PPO's pessimistic surrogate min(r A, clip(r) A) and where it has no gradient (the clip is the min)."""
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, lo, hi) * adv
    use_clipped = clipped < unclipped
    pg = jnp.where(use_clipped, jax.lax.stop_gradient(clipped), unclipped)
    return pg, use_clipped


def group_advantages(rewards: Any, group_ids: Any, *, std_normalize: bool = False,
                     eps: float = 1e-6) -> np.ndarray:
    """Per-response advantage r_j - mean(r over the responses with the same group id) (Eq. 1).

    `group_ids` marks which responses answer the same prompt (any hashable ints; groups need not be
    contiguous). `std_normalize=True` divides by the group's standard deviation (population, ddof=0) plus
    `eps`: GRPO's advantage, the comparison baseline; Eq. 1 does not divide. A group of one has advantage 0.
    Returns float32 (batch,).
    """
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(group_ids)
    if r.ndim != 1:
        raise ValueError(f"rewards has shape {r.shape}; expected (batch,) one reward per response")
    if g.shape != r.shape:
        raise ValueError(f"group_ids has shape {g.shape}; expected {r.shape} like rewards")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards has non-finite values at {np.flatnonzero(~np.isfinite(r)).tolist()}")
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    mean = np.bincount(inv, weights=r) / counts
    adv = r - mean[inv]
    if std_normalize:
        var = np.bincount(inv, weights=adv**2) / counts
        adv = adv / (np.sqrt(var)[inv] + eps)
    return adv.astype(np.float32)
