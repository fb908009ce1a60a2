"""The swarm around a k25 model: subagents (and the single-agent baseline) served by the k25 OpenAI-compatible
server and by the in-process SamplerClient. The tiny model has random weights, so its turns are noise: the
point is that every episode finishes, with the model's failures reported as failed tasks."""

import asyncio
import json

import jax.numpy as jnp
import pytest
from chat_fixtures import Server, random_model

from k25.data import chat
from k25.infer import Sampler
from k25.infer.client import OpenAIClient, SamplerClient, ScriptedClient
from k25.model.config import tiny
from k25.serve.app import create_app
from k25.serve.engine import Engine
from k25.swarm import SwarmConfig
from k25.swarm.evaluate import evaluate
from k25.swarm.policies import scripted_policy
from k25.swarm.tasks import SwarmEnv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def k25_server():
    fmt = chat.byte_chat_format()
    cfg = tiny(vocab_size=288, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
               max_position_embeddings=4096)
    sampler = Sampler(random_model(cfg), max_slots=4, max_len=4096, cache_dtype=jnp.float32, min_bucket=4096)
    server = Server(create_app(Engine(sampler, fmt, model_name="tiny")))
    yield server.url, sampler, fmt
    server.stop()


@pytest.fixture(scope="module")
def env():
    return SwarmEnv(0)


def test_swarm_run_single_agent_against_the_k25_server(k25_server, capsys):
    from absl import flags

    from experiments import swarm_run

    url = k25_server[0]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["swarm_run", "--endpoint", url, "--model", "tiny", "--tasks", "long_doc", "--num_tasks", "1",
                 "--single_agent", "--single_max_steps", "2", "--max_tokens", "16", "--request_timeout_s", "120"])
    try:
        swarm_run.main(["swarm_run"])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    assert summary["mode"] == "single_agent" and summary["overall"]["episodes"] == 1
    assert 1 <= summary["overall"]["critical_steps"] <= 2 and summary["overall"]["success"] in (0.0, 1.0)


@pytest.mark.parametrize("backend", ["server", "in_process"])
def test_k25_subagents_failing_are_reported_not_hung(k25_server, env, backend):
    url, sampler, fmt = k25_server
    sub = (OpenAIClient("tiny", base_url=url, timeout_s=120, max_retries=0) if backend == "server"
           else SamplerClient(sampler, fmt, model="tiny"))
    task = env.tasks("long_doc", "heldout", 1)[0]
    cfg = SwarmConfig(sub_max_steps=2, max_tokens=16, sub_timeout_s=120, episode_timeout_s=600)
    rows, traces = asyncio.run(evaluate([task], env.tools(), orchestrator=ScriptedClient(scripted_policy(pages_per_agent=4)),
                                        subagent=sub, config=cfg))
    trace = traces[0]
    assert trace.status == "done" and trace.subagents
    for r in trace.subagents:  # noise: no usable answer, or tool calls that run out of steps
        assert 1 <= r["steps"] <= 2 and r["status"] in ("done", "error", "step_limit")
    failed = [r for r in trace.subagents if r["status"] != "done"]
    tool_errors = [m["content"] for m in trace.messages if m["role"] == "tool" and m["content"].startswith("Error")]
    assert len(tool_errors) == len(failed)
    assert rows[0]["critical_steps"] == trace.critical_steps <= 3 + 2 * (1 + 2)
