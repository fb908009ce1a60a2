"""Serve a checkpoint over the OpenAI API (chat, completions, models) with FastAPI + uvicorn.

    python -m experiments.serve --checkpoint=PATH [--host 127.0.0.1 --port 8000 --api_key KEY]

PATH is a k25 run directory or an HF checkpoint directory (k25/serve/load.py). Every request goes through
one continuous-batching sampler (k25/infer); the API is k25/serve/app.py. `stream: true` responses carry the
tokens as the sampler samples them (k25/serve/stream.py).
"""

from __future__ import annotations

import os

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "k25 run directory or HF checkpoint directory (required).")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "If set, clients must send 'Authorization: Bearer KEY'.")
flags.DEFINE_string("model_name", None, "Model id clients pass as `model` (default: the checkpoint's basename).")
flags.DEFINE_integer("max_slots", 8, "Sequences decoded at once (the continuous batch).")
flags.DEFINE_integer("max_len", 2048, "Context per sequence: prompt + completion tokens.")
flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"], "KV cache dtype.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.checkpoint:  # checked here, not as a required flag: see experiments/convert.py
        raise app.UsageError("--checkpoint required: a k25 run directory or an HF checkpoint directory.")
    import uvicorn

    from k25.serve.app import create_app
    from k25.serve.engine import Engine
    from k25.serve.load import load_sampler

    sampler, chat = load_sampler(FLAGS.checkpoint, max_slots=FLAGS.max_slots, max_len=FLAGS.max_len,
                                 cache_dtype=FLAGS.cache_dtype)
    name = FLAGS.model_name or os.path.basename(os.path.normpath(FLAGS.checkpoint))
    engine = Engine(sampler, chat, model_name=name)
    uvicorn.run(create_app(engine, api_key=FLAGS.api_key), host=FLAGS.host, port=FLAGS.port)


if __name__ == "__main__":
    app.run(main)
