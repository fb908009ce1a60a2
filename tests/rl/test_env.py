"""The Gym-like environment: token-in-token-out trajectories equal the chat format's rendering of the whole
conversation; tool errors reach the model; the judge scores the final turn; plain completion turns."""

import asyncio

import pytest

from k25.data.chat import byte_chat_format
from k25.data.tokenizer import ByteTokenizer
from k25.rl.env import AgentEnv, ChatTurns, PlainTurns, RewardJudge, Task
from k25.tools.base import Tool, ToolResult, Toolset

CHAT = byte_chat_format()


class Add(Tool):
    name, description = "add", "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"]}

    async def call(self, arguments):
        return ToolResult(text=str(arguments["a"] + arguments["b"]))


def turn(text):
    return CHAT.encode_text(text) + [CHAT.im_end_id]


def test_multi_turn_trajectory_is_the_formats_rendering():
    env = AgentEnv(ChatTurns(CHAT), RewardJudge({"weights": {"exact_match": 1.0}}), Toolset([Add()]), max_turns=4)
    task = Task(id="q", messages=[{"role": "user", "content": "What is 2+3?"}], target="5")
    ids = env.reset(task)
    mask = [0] * len(ids)
    actions = [
        '<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>'
        '{"a": 2, "b": 3}<|tool_call_end|><|tool_call_begin|>functions.nope:1<|tool_call_argument_begin|>{}'
        '<|tool_call_end|><|tool_calls_section_end|>',
        '<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.add:2<|tool_call_argument_begin|>'
        '{"a": "x"}<|tool_call_end|><|tool_calls_section_end|>',
        "<think></think>Answer: 5",
    ]
    infos = []
    for k, text in enumerate(actions):
        action = turn(text)[len(CHAT.encode_text("<think></think>")):]  # the generation prompt holds the prefix
        ids += action
        mask += [1] * len(action)
        obs, reward, done, info = asyncio.run(env.step(action))
        infos.append(info)
        ids += obs
        mask += [0] * len(obs)
        assert done == (k == 2)
    assert reward == 1.0 and infos[0]["tool_calls"] == 2 and infos[0]["tool_errors"] == 1
    assert infos[1]["tool_errors"] == 1  # schema error, reported to the model
    whole = CHAT.encode(env.messages, Toolset([Add()]).schemas(), thinking=False)
    assert ids == whole.ids and mask == whole.loss_mask
    tool_texts = [m["content"] for m in env.messages if m["role"] == "tool"]
    assert tool_texts[0] == "5" and "unknown tool 'nope'" in tool_texts[1] and "schema" in tool_texts[2]
    with pytest.raises(RuntimeError, match="reset"):
        asyncio.run(env.step(action))


def test_truncated_turn_ends_the_episode_and_max_turns():
    env = AgentEnv(ChatTurns(CHAT), RewardJudge({"weights": {"exact_match": 1.0}}), Toolset([Add()]), max_turns=1)
    env.reset(Task(id="q", messages=[{"role": "user", "content": "2+3?"}], target="5"))
    obs, reward, done, info = asyncio.run(env.step(CHAT.encode_text("Answer: 5")))  # no stop id: cut off
    assert done and info["truncated"] and reward == 1.0 and obs == []
    env.reset(Task(id="q", messages=[{"role": "user", "content": "2+3?"}], target="5"))
    call = turn('<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>'
                '{"a": 2, "b": 3}<|tool_call_end|><|tool_calls_section_end|>')
    obs, reward, done, info = asyncio.run(env.step(call))  # max_turns=1: judged, no tool run
    assert done and reward == 0.0 and not info["truncated"]


def test_plain_turns_match_the_lm_format():
    tok = ByteTokenizer()
    env = AgentEnv(PlainTurns(tok), RewardJudge({"weights": {"exact_match": 1.0}}))
    ids = env.reset(Task(id="r", messages=[{"role": "user", "content": "Q: 3+4=? A: "}], target="7"))
    assert ids == [tok.bos_id] + tok.encode("Q: 3+4=? A: ")
    _, reward, done, _ = asyncio.run(env.step(tok.encode("7") + [tok.eos_id]))
    assert done and reward == 1.0
    with pytest.raises(ValueError, match="tool"):
        AgentEnv(PlainTurns(tok), RewardJudge({"weights": {"exact_match": 1.0}}), Toolset([Add()])).reset(
            Task(id="r", messages=[{"role": "user", "content": "x"}]))
