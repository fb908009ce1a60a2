"""The OpenAI-compatible server, driven by the official `openai` client.

One server runs a tiny K2 through the real continuous-batching sampler (plain, streamed, forced tool call,
32 concurrent requests, token ids against the sampler's own, bad input, a client gone mid-stream); a second
serves a scripted sampler that writes fixed completions and streams them token by token, so tool-call parsing,
tool-call streaming and when chunks reach the client are checked deterministically. Streamed answers are
compared with the non-streamed answer to the same greedy request, delta by delta summed up. Both servers bind
127.0.0.1 on a free port and stop at the end of the module.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from chat_fixtures import Server, random_model

from k25.data import chat
from k25.infer import Completion, Request, Sampler, Token
from k25.infer.client import OpenAIClient, SamplerClient
from k25.model.config import tiny
from k25.serve.app import create_app
from k25.serve.engine import Engine

KEY = "test-key"
MAX_LEN = 256
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def fmt():
    return chat.byte_chat_format()


@pytest.fixture(scope="module")
def sampler(fmt):
    cfg = tiny(vocab_size=288, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    return Sampler(random_model(cfg), max_slots=8, max_len=MAX_LEN, cache_dtype=jnp.float32,
                   min_bucket=MAX_LEN)  # one prefill and one decode shape: one compile each


@pytest.fixture(scope="module")
def server(sampler, fmt):
    s = Server(create_app(Engine(sampler, fmt, model_name="tiny"), api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, timeout=120, max_retries=0)


def test_models_and_plain_greedy_chat_matches_the_sampler(client, sampler, fmt):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    resp = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"return_token_ids": True})
    extra, choice = resp.model_extra, resp.choices[0]
    prompt = fmt.encode(HELLO, add_generation_prompt=True).ids
    assert extra["prompt_token_ids"] == prompt
    (ref,) = sampler.generate([Request(prompt, 6, temperature=0.0, stop_ids=fmt.stop_ids)])
    assert choice.model_extra["token_ids"] == ref.token_ids
    np.testing.assert_allclose([t.logprob for t in choice.logprobs.content], ref.logprobs, atol=1e-5)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert choice.finish_reason in ("stop", "length")
    want = chat.parse_assistant(fmt.decode(ref.token_ids), thinking=True)
    assert choice.message.content == want["content"]
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(ref.token_ids)


def test_seeded_sampling_is_deterministic_and_n_choices(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=5, temperature=1.0, seed=7, n=3,
              extra_body={"return_token_ids": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    ids = [c.model_extra["token_ids"] for c in a.choices]
    assert ids == [c.model_extra["token_ids"] for c in b.choices] and len(ids) == 3


def collect(chunks) -> dict[int, dict]:
    """Streamed chat chunks summed up per choice index: reasoning, content, tool calls, logprobs, finish, ids."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for ch in chunk.choices:
            o = out.setdefault(ch.index, {"reasoning": "", "content": "", "calls": {}, "logprobs": [], "finish": None,
                                          "token_ids": None, "text_chunks": 0})
            d = ch.delta
            extra = d.model_extra or {}
            o["reasoning"] += extra.get("reasoning_content") or ""
            o["content"] += d.content or ""
            o["text_chunks"] += bool(d.content or extra.get("reasoning_content"))
            for tc in d.tool_calls or ():
                call = o["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            o["logprobs"] += [(t.token, t.logprob) for t in (ch.logprobs.content or ())] if ch.logprobs else []
            o["finish"] = ch.finish_reason or o["finish"]
            o["token_ids"] = (ch.model_extra or {}).get("token_ids", o["token_ids"])
    return out


def assert_stream_equals(streamed: dict, plain) -> None:
    msg = plain.message
    assert streamed["reasoning"] == ((msg.model_extra or {}).get("reasoning_content") or "")
    assert streamed["content"] == (msg.content or "")
    assert [streamed["calls"][k] for k in sorted(streamed["calls"])] == [
        {"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls or ()]
    assert streamed["finish"] == plain.finish_reason
    if plain.model_extra.get("token_ids") is not None:
        assert streamed["token_ids"] == plain.model_extra["token_ids"]
    if plain.logprobs is not None:
        assert streamed["logprobs"] == [(t.token, t.logprob) for t in plain.logprobs.content]


@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_chat_equals_the_plain_answer(client, thinking):
    kw = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=0, n=2, logprobs=True, top_logprobs=2,
              extra_body={"chat_template_kwargs": {"thinking": thinking}, "return_token_ids": True})
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = collect(chunks)
    assert sorted(streamed) == [0, 1]
    for i, choice in enumerate(plain.choices):
        assert_stream_equals(streamed[i], choice)
        assert streamed[i]["text_chunks"] > 1  # sent as it was sampled, not in one piece at the end
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_forced_tool_call_equals_the_plain_answer(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], max_tokens=12,
              temperature=0, tool_choice="required", extra_body={"return_token_ids": True})
    plain = client.chat.completions.create(**kw).choices[0]
    assert_stream_equals(collect(client.chat.completions.create(stream=True, **kw))[0], plain)


def test_streamed_completions_equal_the_plain_answer(client):
    kw = dict(model="tiny", prompt=["Hello", "Hi"], max_tokens=12, temperature=0, n=2, logprobs=2,
              extra_body={"return_token_ids": True})
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for c in plain.choices:
        mine = [ch for chunk in chunks for ch in chunk.choices if ch.index == c.index]
        assert "".join(ch.text for ch in mine) == c.text and mine[-1].finish_reason == c.finish_reason
        assert sum(bool(ch.text) for ch in mine) > 1
        assert mine[-1].model_extra["token_ids"] == c.model_extra["token_ids"]
        assert mine[-1].model_extra["prompt_token_ids"] == c.model_extra["prompt_token_ids"]
        assert [lp for ch in mine if ch.logprobs for lp in ch.logprobs.token_logprobs] == c.logprobs.token_logprobs
        assert [t for ch in mine if ch.logprobs for t in ch.logprobs.top_logprobs] == c.logprobs.top_logprobs
    assert len(plain.choices) == 4 and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def read_until(resp: httpx.Response, words: str, limit: int = 200) -> None:
    for k, line in enumerate(resp.iter_lines()):
        assert k < limit and line != "data: [DONE]", "the stream ended before the awaited chunk"
        if words in line:
            return


def test_client_gone_mid_stream_frees_the_sampler(server, client, sampler, monkeypatch):
    # the tiny model decodes 200 tokens faster than a loaded machine reads the first chunk; 20 ms a step
    # keeps the request in flight until the client goes
    decode = sampler._decode_step

    def slow_decode() -> None:
        decode()
        time.sleep(0.02)

    monkeypatch.setattr(sampler, "_decode_step", slow_decode)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            read_until(resp, '"reasoning_content"')
            (active,) = [a for a in sampler._slots if a is not None and a.pending.request.max_new_tokens == 200]
    deadline = time.monotonic() + 60
    while sampler._has_work():
        assert time.monotonic() < deadline, "the abandoned request still holds the sampler"
        time.sleep(0.01)
    assert len(active.tokens) < 200  # cancelled, not run to its max_tokens
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices  # still serving


def test_thinking_flag_and_forced_named_tool_call_reach_the_prompt(client, fmt):
    off = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1, temperature=0,
                                         extra_body={"return_token_ids": True, "chat_template_kwargs":
                                                     {"thinking": False}})
    assert fmt.decode(off.model_extra["prompt_token_ids"]).endswith("<|im_middle|><think></think>")
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], max_tokens=8,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"return_token_ids": True})
    prompt = fmt.decode(resp.model_extra["prompt_token_ids"])
    assert prompt.endswith("<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                           "<|tool_call_argument_begin|>")
    msg = resp.choices[0].message
    # a random model's arguments are not JSON: the call is reported as invalid, never dropped
    ids = [t.id for t in msg.tool_calls or ()] + [c["id"] for c in msg.model_extra.get("invalid_tool_calls") or ()]
    assert ids[0] == "functions.get_weather:0"


def test_32_concurrent_requests_are_all_answered(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, timeout=300, max_retries=0)
        jobs = [aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n{i}"}],
                                                max_tokens=4, seed=i, extra_body={"return_token_ids": True})
                for i in range(32)]
        out = await asyncio.wait_for(asyncio.gather(*jobs), 300)
        await aclient.close()
        return out

    results = asyncio.run(run())
    assert len(results) == 32 and all(1 <= len(r.choices[0].model_extra["token_ids"]) <= 4 for r in results)


def test_completions_take_token_ids_and_text(client, sampler):
    ids = [72, 101, 108, 108, 111]
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, logprobs=1,
                                     extra_body={"return_token_ids": True})
    (ref,) = sampler.generate([Request(ids, 5, temperature=0.0)])
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids
    assert resp.choices[0].model_extra["prompt_token_ids"] == ids
    np.testing.assert_allclose(resp.choices[0].logprobs.token_logprobs, ref.logprobs, atol=1e-5)
    text = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert text.choices[0].model_extra["token_ids"] == ref.token_ids
    streamed = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == text.choices[0].finish_reason


def test_stop_token_ids_end_generation(client, sampler):
    """vLLM's `stop_token_ids` (what k25.rl.rollout.EndpointPolicy sends): generation ends at the first of them,
    which is included in `token_ids`, with finish_reason "stop"; the same for chat."""
    ids = [72, 101, 108, 108, 111]
    (ref,) = sampler.generate([Request(ids, 8, temperature=0.0)])
    k = next(i for i in range(1, len(ref.token_ids)) if ref.token_ids[i] not in ref.token_ids[:i])
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                                     extra_body={"return_token_ids": True, "stop_token_ids": [ref.token_ids[k]]})
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids[: k + 1]
    assert resp.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})
    got = plain.choices[0].model_extra["token_ids"]
    assert plain.choices[0].finish_reason == "length"
    j = next(i for i in range(1, len(got)) if got[i] not in got[:i])
    cut = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True, "stop_token_ids": [got[j]]})
    assert cut.choices[0].model_extra["token_ids"] == got[: j + 1]
    assert cut.choices[0].finish_reason == "stop"


def test_openai_client_gets_token_ids_back(server):
    c = OpenAIClient("tiny", base_url=server.url, api_key=KEY)
    res = asyncio.run(c.chat(HELLO, max_tokens=4, temperature=0))
    assert res.prompt_ids and res.token_ids and len(res.logprobs) == len(res.token_ids)


def test_sampler_client_in_process(sampler, fmt):
    c = SamplerClient(sampler, fmt, model="tiny")
    res = asyncio.run(c.chat(HELLO, max_tokens=4, temperature=0))
    (ref,) = sampler.generate([Request(fmt.encode(HELLO, add_generation_prompt=True).ids, 4, temperature=0.0,
                                       stop_ids=fmt.stop_ids)])
    assert res.token_ids == ref.token_ids and res.prompt_ids == ref.prompt_ids
    np.testing.assert_allclose(res.logprobs, ref.logprobs, atol=1e-6)


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, client):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as h:
        def post(path, body=None, raw=None, headers=auth):
            return h.post(url + path, json=body, content=raw, headers={**headers, "content-type": "application/json"})

        cases = [
            (post("/chat/completions", raw=b'{"model": "tiny", "messages": [}'), 400, "JSON"),
            (post("/chat/completions", {"model": "tiny"}), 422, "messages"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO, "temperature": 9}), 422, "temperature"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": "x"}), 422, "max_tokens"),
            (post("/chat/completions", {"model": "nope", "messages": HELLO}), 404, "nope"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO}, headers={"Authorization": "Bearer x"}),
             401, "API key"),
            (post("/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}),
             400, str(MAX_LEN)),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": MAX_LEN}), 400,
             str(MAX_LEN)),
            (post("/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400,
             "role"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO, "tools": [WEATHER],
                                        "tool_choice": {"type": "function", "function": {"name": "zzz"}}}),
             400, "zzz"),
            (post("/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png()}}]}]}), 400, "text-only"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO,
                                        "chat_template_kwargs": {"thinking": "yes"}}), 400, "thinking"),
            (post("/completions", {"model": "tiny", "prompt": [1, 2, 99999]}), 400, "vocabulary"),
            (post("/completions", {"model": "tiny", "prompt": []}), 400, "prompt"),
            (post("/completions", {"model": "tiny", "prompt": [1, 2], "stop_token_ids": [-1]}), 422,
             "stop_token_ids"),
            (post("/completions", {"model": "tiny", "prompt": [1, 2, 99999], "stream": True}), 400, "vocabulary"),
            (post("/completions", {"model": "tiny", "prompt": [[1, 2], [99999]], "stream": True}), 400, "vocabulary"),
            (post("/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": MAX_LEN, "stream": True}),
             400, str(MAX_LEN)),
            (post("/nothing", {}), 404, "Not Found"),
        ]
        for resp, status, words in cases:
            assert resp.status_code == status, (resp.status_code, resp.text)
            err = resp.json()["error"]
            assert words in err["message"] and {"message", "type", "param", "code"} <= set(err), err
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10_000)
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices  # still serving


# ------------------------------------------------------------------ a scripted sampler: deterministic tool calls
class ScriptedSampler:
    """Stands in for the sampler: answers from the prompt's text with a fixed completion, honouring stop ids."""

    multimodal, max_len = False, 4096

    def __init__(self, fmt: chat.ChatFormat):
        self.fmt, self.vocab_size, self.seen = fmt, fmt.tokenizer.vocab_size, []
        self.gate, self.gate_opened, self.abandoned = None, None, 0

    async def submit(self, r: Request) -> Completion:
        prompt = self.fmt.decode(r.prompt_ids)
        self.seen.append(prompt)
        if prompt.endswith("<|tool_call_argument_begin|>"):
            text = '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        elif "weather" in prompt:
            text = ("two cities</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                    '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>'
                    'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
                    "<|tool_calls_section_end|><|im_end|>")
        else:
            text = "greet</think>Hello there!<|im_end|>"
        ids = self.fmt.encode_text(text)
        stop = [k for k, t in enumerate(ids) if t in set(r.stop_ids)]
        ids = ids[: stop[0] + 1] if stop else ids[: r.max_new_tokens]
        reason = "stop" if stop else "length"
        return Completion(list(r.prompt_ids), ids, [-0.5 - 0.01 * k for k in range(len(ids))], reason)

    def stream(self, r: Request):
        """submit's completion token by token; with `gate` set, the last token waits (up to 20 s) for the test to
        open the gate, and `gate_opened` says whether it did. `abandoned` counts streams closed before the end."""
        gate = self.gate

        async def run():
            c, finished = await self.submit(r), False
            try:
                for k, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                    if gate is not None and k == len(c.token_ids) - 1:
                        deadline = time.monotonic() + 20
                        while not gate.is_set() and time.monotonic() < deadline:
                            await asyncio.sleep(0.01)
                        self.gate_opened = gate.is_set()
                    if k == 2 and "explode" in self.fmt.decode(r.prompt_ids):
                        raise RuntimeError("device lost")
                    yield Token(t, lp, [])
                finished = True
                yield c
            finally:
                self.abandoned += not finished

        return run()


@pytest.fixture(scope="module")
def scripted(fmt):
    s = ScriptedSampler(fmt)
    srv = Server(create_app(Engine(s, fmt, model_name="scripted")))
    yield s, openai.OpenAI(base_url=srv.url, api_key="none", timeout=30, max_retries=0)
    srv.stop()


def test_parallel_tool_calls_keep_the_model_ids(scripted):
    _, c = scripted
    msgs = [{"role": "user", "content": "weather in Paris and Rome?"}]
    resp = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER])
    msg, choice = resp.choices[0].message, resp.choices[0]
    assert choice.finish_reason == "tool_calls" and msg.content == "Checking."
    assert msg.model_extra["reasoning_content"] == "two cities"
    assert [(t.id, t.function.name, t.function.arguments) for t in msg.tool_calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
        ("functions.get_weather:1", "get_weather", '{"city": "Rome"}')]


def test_streamed_tool_call_deltas_accumulate_to_the_calls(scripted):
    _, c = scripted
    msgs = [{"role": "user", "content": "weather in Paris and Rome?"}]
    kw = dict(model="scripted", messages=msgs, tools=[WEATHER], n=2, logprobs=True,
              extra_body={"return_token_ids": True})
    plain = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    streamed = collect(chunks)
    for i, choice in enumerate(plain.choices):
        assert_stream_equals(streamed[i], choice)
    s0 = streamed[0]
    assert s0["finish"] == "tool_calls" and s0["content"] == "Checking." and s0["reasoning"] == "two cities"
    assert [s0["calls"][k] for k in sorted(s0["calls"])] == [
        {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "functions.get_weather:1", "name": "get_weather", "arguments": '{"city": "Rome"}'}]
    assert s0["text_chunks"] > 2
    # the first call is sent when the second begins, before the section (and the completion) ends
    deltas = [ch.delta for chunk in chunks for ch in chunk.choices if ch.index == 0]
    first = next(k for k, d in enumerate(deltas) if d.tool_calls)
    assert deltas[first].tool_calls[0].id == "functions.get_weather:0" and deltas[first + 1].tool_calls[0].index == 0
    assert [d.tool_calls[0].index for d in deltas if d.tool_calls] == [0, 0, 1, 1]


def test_streamed_forced_and_suppressed_tool_calls_equal_the_plain_answer(scripted):
    _, c = scripted
    msgs = [{"role": "user", "content": "weather?"}]
    for choice in [{"type": "function", "function": {"name": "get_weather"}}, "none", "auto"]:
        kw = dict(model="scripted", messages=msgs, tools=[WEATHER], tool_choice=choice)
        plain = c.chat.completions.create(**kw).choices[0]
        assert_stream_equals(collect(c.chat.completions.create(stream=True, **kw))[0], plain)
    kw = dict(model="scripted", messages=HELLO, stop=["there"])  # a stop string cuts the streamed text too
    plain = c.chat.completions.create(**kw).choices[0]
    assert plain.message.content == "Hello "
    assert_stream_equals(collect(c.chat.completions.create(stream=True, **kw))[0], plain)


def test_chunks_reach_the_client_before_the_completion_exists(scripted):
    s, c = scripted
    s.gate, s.gate_opened = threading.Event(), None
    content = ""
    try:
        for chunk in c.chat.completions.create(model="scripted", messages=HELLO, stream=True):
            content += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if content:
                s.gate.set()  # the sampler holds the last token back until the client has seen content
    finally:
        s.gate = None
    assert s.gate_opened and content == "Hello there!"


def test_failure_mid_stream_is_an_error_event(scripted):
    _, c = scripted
    with httpx.Client(timeout=30) as h:
        resp = h.post(str(c.base_url) + "chat/completions", json={
            "model": "scripted", "messages": [{"role": "user", "content": "explode"}], "stream": True})
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "device lost" in error["message"] and error["type"] == "server_error"
    with pytest.raises(openai.APIError, match="device lost"):  # the official client raises it
        list(c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "explode"}],
                                       stream=True))
    assert c.chat.completions.create(model="scripted", messages=HELLO).choices[0].message.content == "Hello there!"


def test_client_gone_mid_stream_cancels_the_generation(scripted):
    s, c = scripted
    s.gate, before = threading.Event(), s.abandoned  # never opened: the generation waits for the client
    try:
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", str(c.base_url) + "chat/completions",
                          json={"model": "scripted", "messages": HELLO, "stream": True}) as resp:
                read_until(resp, json.dumps({"content": "H"})[1:-1])
        deadline = time.monotonic() + 10
        while s.abandoned == before:
            assert time.monotonic() < deadline, "the server did not cancel the abandoned stream"
            time.sleep(0.01)
    finally:
        s.gate = None
    assert c.chat.completions.create(model="scripted", messages=HELLO).choices[0].message.content == "Hello there!"


def test_tool_choice_required_named_and_none(scripted):
    s, c = scripted
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    named = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER],
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call_,) = named.choices[0].message.tool_calls
    assert call_.id == "functions.get_weather:1" and call_.function.arguments == '{"city": "Oslo"}'
    assert s.seen[-1].endswith("</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:1"
                               "<|tool_call_argument_begin|>")
    c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER], tool_choice="required")
    assert s.seen[-1].endswith("<think></think><|tool_calls_section_begin|>")
    none = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "weather?"}],
                                     tools=[WEATHER], tool_choice="none")
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content == "Checking."
    assert none.choices[0].finish_reason == "stop"
    stopped = c.chat.completions.create(model="scripted", messages=HELLO, stop=["there"])
    assert stopped.choices[0].message.content == "Hello " and stopped.choices[0].finish_reason == "stop"
