"""Inference for post-training: the MLA compressed KV cache, prefill/decode, continuous batching, TITO logprobs.

Public API: `Sampler`, `Request`, `Completion`, `Token` (one streamed token) (k25/infer/sampler.py);
`kv_bytes_per_token` (cache.py).
"""

from k25.infer.cache import kv_bytes_per_token
from k25.infer.sampler import Completion, Request, Sampler, Token

__all__ = ["Completion", "Request", "Sampler", "Token", "kv_bytes_per_token"]
