"""Helpers shared by the chat-format and server tests: a synthetic Kimi tokenizer directory, a random K2Model
without per-initializer compiles, and uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import uvicorn
from flax import nnx

from k25.model.decoder import K2Model

KIMI_SPECIAL_NAMES = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                      10: "<|im_system|>", 11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
                      13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
                      17: "<|im_middle|>", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>",
                      21: "<|media_pad|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]"}


def write_synthetic_kimi_tokenizer(path: str) -> int:
    """A tiny BPE laid out like the released files (ranks, then 256 special slots named in tokenizer_config);
    returns the number of ranks."""
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b"in", b" the", b"at", b"er"]
    with open(os.path.join(path, "tiktoken.model"), "w") as f:
        for i, r in enumerate(ranks):
            f.write(f"{base64.b64encode(r).decode()} {i}\n")
    n = len(ranks)
    cfg = {"added_tokens_decoder": {str(n + k): {"content": v, "special": True} for k, v in KIMI_SPECIAL_NAMES.items()},
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "tokenizer_class": "TikTokenTokenizer"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return n


def random_model(cfg, cls=K2Model) -> nnx.Module:
    """A K2Model (or `cls`) with numpy-drawn weights (norm scales 1, routing biases 0). Eager init compiles every
    initializer, tens of seconds on a loaded CPU; here the shapes come from eval_shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        value = np.ones(leaf.shape) if "scale" in name else np.zeros(leaf.shape) if "bias" in name else \
            rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free 127.0.0.1 port, stopped by `stop()`."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start in 30 s"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
