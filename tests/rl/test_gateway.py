"""The LLM gateway: a third-party agent loop on the official openai client, through the gateway on 127.0.0.1,
recorded as token trajectories equal to what the sampler produced."""

from __future__ import annotations

import json
import threading

import openai
import pytest
from chat_fixtures import Server

from k25.data import chat
from k25.infer import Completion, Request
from k25.rl.gateway import Call, Gateway, stitch

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                        "parameters": {"type": "object", "required": ["a", "b"],
                                                       "properties": {"a": {"type": "integer"},
                                                                      "b": {"type": "integer"}}}}}


class ScriptedSampler:
    """Fixed completions from the prompt's text (a tool call first, then the answer), honouring stop ids."""

    multimodal, max_len = False, 4096

    def __init__(self, fmt):
        self.fmt, self.vocab_size = fmt, fmt.tokenizer.vocab_size
        self.lock, self.served = threading.Lock(), []

    async def submit(self, r: Request) -> Completion:
        prompt = self.fmt.decode(r.prompt_ids)
        if "## Return of" in prompt:
            text = "the tool said " + prompt.rsplit("## Return of functions.add:0\n", 1)[1].split("<|im_end|>")[0] + \
                   "</think>The sum is " + prompt.rsplit("\n", 1)[-1][:0] + "done.<|im_end|>"
        else:
            text = ('add them</think><|tool_calls_section_begin|><|tool_call_begin|>functions.add:0'
                    '<|tool_call_argument_begin|>{"a": 2, "b": 3}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
        ids = self.fmt.encode_text(text)
        stop = [k for k, t in enumerate(ids) if t in set(r.stop_ids)]
        ids = ids[: stop[0] + 1] if stop else ids[: r.max_new_tokens]
        lps = [-0.01 * (k + 1) - r.seed % 7 for k in range(len(ids))]
        with self.lock:
            self.served.append((list(r.prompt_ids), ids, lps))
        return Completion(list(r.prompt_ids), ids, lps, "stop" if stop else "length")


@pytest.fixture(scope="module")
def gateway():
    fmt = chat.byte_chat_format()
    sampler = ScriptedSampler(fmt)
    gw = Gateway(sampler, fmt, model_name="policy")
    srv = Server(gw.app)
    yield gw, sampler, srv.url.removesuffix("/v1")
    srv.stop()


def agent_loop(base_url: str) -> tuple[str, list]:
    """A black-box agent: plain openai client, its own tool execution and message history."""
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=30, max_retries=0)
    messages = [{"role": "user", "content": "What is 2+3? Use the tool."}]
    seen = []
    for _ in range(4):
        r = client.chat.completions.create(model="policy", messages=messages, tools=[ADD], logprobs=True, seed=1,
                                           extra_body={"return_token_ids": True})
        choice = r.choices[0]
        extra = r.model_dump()
        seen.append((extra["prompt_token_ids"], extra["choices"][0]["token_ids"],
                     [t.logprob for t in choice.logprobs.content]))
        msg = choice.message
        messages.append({"role": "assistant", "content": msg.content,
                         "reasoning_content": extra["choices"][0]["message"].get("reasoning_content"),
                         "tool_calls": [c.model_dump() for c in msg.tool_calls or []]})
        if not msg.tool_calls:
            return msg.content, seen
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])})
    raise AssertionError("the agent did not finish")


def test_agent_traffic_becomes_one_token_trajectory(gateway):
    gw, sampler, url = gateway
    answer, seen = agent_loop(f"{url}/sessions/ep-1/v1")
    assert answer == "The sum is done." and len(seen) == 2
    calls = gw.calls("ep-1")
    # recorded exactly what the sampler produced and the client received
    assert [(c.prompt_ids, c.token_ids, c.logprobs) for c in calls] == [tuple(s) for s in sampler.served[-2:]]
    assert [(c.prompt_ids, c.token_ids) for c in calls] == [(p, t) for p, t, _ in seen]
    assert [c.logprobs for c in calls] == [lp for _, _, lp in seen]
    (traj,) = gw.trajectories("ep-1")
    p1, c1, _ = seen[0]
    p2, c2, _ = seen[1]
    assert traj.prompt_ids == p1 and traj.calls == 2
    assert traj.ids == c1 + p2[len(p1) + len(c1):] + c2  # the second prompt extends the first trajectory
    assert traj.mask == [1] * len(c1) + [0] * (len(p2) - len(p1) - len(c1)) + [1] * len(c2)
    assert [lp for lp, m in zip(traj.logprobs, traj.mask) if m] == calls[0].logprobs + calls[1].logprobs
    assert "## Return of functions.add:0\n5" in chat.byte_chat_format().decode(traj.ids)
    assert "ep-1" not in gw.sessions()  # popped


def test_concurrent_sessions_are_kept_apart_and_become_episodes(gateway):
    gw, _, url = gateway
    threads = [threading.Thread(target=agent_loop, args=(f"{url}/sessions/s{k}/v1",)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(gw.sessions()) == [f"s{k}" for k in range(6)]
    for k in range(6):
        (ep,) = gw.episodes(f"s{k}", reward=1.0, group="g")
        assert ep.status == "done" and ep.turns == 2 and len(ep.ids) == len(ep.mask) == len(ep.logprobs)
    # the plain /v1 routes still serve (unrecorded), and bad input is the server's OpenAI error, not a 500
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=0)
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/sessions/x/v1", api_key="none", max_retries=0).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "hi"}])
    assert gw.sessions() == []


def test_stitch_starts_a_new_trajectory_when_the_history_was_rewritten():
    a = Call([1, 2], [3, 4], [-0.1, -0.2], "stop")
    b = Call([1, 2, 3, 4, 9], [5], [-0.3], "stop")  # extends a
    c = Call([1, 7], [8], [-0.4], "stop")  # the agent rewrote its history
    t1, t2 = stitch([a, b, c])
    assert (t1.prompt_ids, t1.ids, t1.mask, t1.logprobs) == ([1, 2], [3, 4, 9, 5], [1, 1, 0, 1],
                                                              [-0.1, -0.2, 0.0, -0.3])
    assert (t2.prompt_ids, t2.ids, t2.mask) == ([1, 7], [8], [1])


def test_rollouts_over_an_openai_compatible_tito_endpoint(gateway):
    """The rollout manager on `EndpointPolicy`: token-id prompts to /v1/completions, token ids and logprobs
    back; multi-turn episodes with a tool, exactly the tokens the sampler produced."""
    import asyncio

    from k25.rl.env import AgentEnv, ChatTurns, RewardJudge, Task
    from k25.rl.rollout import EndpointPolicy, EnvPool, RolloutConfig, RolloutManager
    from k25.tools.base import Tool, ToolResult, Toolset

    class Add(Tool):
        name, description, parameters = "add", "Add two integers.", ADD["function"]["parameters"]

        async def call(self, arguments):
            return ToolResult(text=str(arguments["a"] + arguments["b"]))

    gw, sampler, url = gateway
    fmt = chat.byte_chat_format()
    policy = EndpointPolicy("policy", base_url=f"{url}/v1", max_len=4096)
    judge = RewardJudge({"weights": {"exact_match": 1.0}})
    pool = EnvPool(lambda: AgentEnv(ChatTurns(fmt, thinking=True), judge, Toolset([Add()])), size=8)
    mgr = RolloutManager(policy, pool, RolloutConfig(group_size=2, max_turn_tokens=200, max_response_tokens=600,
                                                     tokens_per_iteration=600, max_inflight=4))
    tasks = [Task(id=f"q{k}", messages=[{"role": "user", "content": "What is 2+3? Use the tool."}],
                  target="The sum is done.") for k in range(3)]
    before = len(sampler.served)
    res = asyncio.run(mgr.run_iteration(tasks, 0))
    assert len(res.finished) == 6 and not res.failed and len(res.groups) == 3
    served = {}
    for p, ids, lps in sampler.served[before:]:
        served.setdefault(tuple(p), []).append((ids, lps))
    for e in res.finished:
        assert e.reward == 1.0 and e.turns == 2 and e.tool_calls == 1
        # each policy turn is a served completion on exactly the trajectory so far
        starts = [0] + [i + 1 for i in range(len(e.mask) - 1) if e.mask[i] == 0 and e.mask[i + 1] == 1]
        for s in starts:
            end = next((i for i in range(s, len(e.mask)) if e.mask[i] == 0), len(e.mask))
            assert (e.ids[s:end], e.logprobs[s:end]) in served[tuple(e.prompt_ids + e.ids[:s])]
