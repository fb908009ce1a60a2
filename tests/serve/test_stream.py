"""Streamed text and chat deltas (k25/serve/stream.py) against the non-streamed answer, token by token.

Random completions over the chat markers, multi-byte characters split across tokens, invalid bytes and stop
strings, on the byte tokenizer and a synthetic Kimi tiktoken directory: the streamed deltas (then `finish`)
must add up to what the server answers without streaming (Engine._choice + assistant_turn), and nothing
streamed may be taken back.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from chat_fixtures import write_synthetic_kimi_tokenizer

from k25.data import chat
from k25.infer import Completion
from k25.serve.engine import Engine, assistant_turn
from k25.serve.stream import ChatStream, Detokenizer, TextStream, stable_parts

# plain text, including pieces that spell a marker across tokens ("</th" + "ink>" is the text "</think>")
TEXT = ["a", "b a", " the", "é", "€", "😀", "<", "</th", "ink>", "think>", "<|tool_calls_sec", "tion_begin|>",
        "<|im_", "end|>", "{", '"x": 1', "}", "\n"]
MARKERS = [chat.THINK, chat.END_THINK, chat.SECTION_BEGIN, chat.CALL_BEGIN, "functions.f:0", "functions.g:1",
           chat.ARG_BEGIN, '{"x": 1}', chat.CALL_END, chat.SECTION_END, chat.IM_END, chat.IM_USER]
WELL_FORMED = ("</think>ok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
               '{"x": 1}<|tool_call_end|><|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{}'
               "<|tool_call_end|><|tool_calls_section_end|>after<|im_end|>")


@pytest.fixture(scope="module", params=["byte", "kimi"])
def fmt(request, tmp_path_factory):
    if request.param == "byte":
        return chat.byte_chat_format()
    path = tmp_path_factory.mktemp("kimi_tok")
    write_synthetic_kimi_tokenizer(str(path))
    return chat.hf_chat_format(str(path))


def engine_for(fmt) -> Engine:
    sampler = types.SimpleNamespace(vocab_size=fmt.max_id + 1, max_len=1 << 16, multimodal=False)
    return Engine(sampler, fmt, model_name="x")


def random_ids(fmt, rng, *, bad_bytes: bool) -> list[int]:
    pieces = TEXT + MARKERS
    ids: list[int] = []
    for _ in range(int(rng.integers(1, 18))):
        piece = pieces[rng.integers(len(pieces))]
        ids += fmt.encode_text(piece)
        if bad_bytes and isinstance(fmt.tokenizer, chat.ByteTokenizer) and rng.random() < 0.1:
            ids.append(int(rng.choice([0xFF, 0xE2, 0x82])))  # invalid or truncated UTF-8
    return ids


def streamed(fmt, ids, *, prefix="", thinking=True, stop=()):
    """(deltas while tokens arrive, the non-streamed message, the finishing deltas)."""
    s = ChatStream(fmt, prefix=prefix, thinking=thinking, stop=stop)
    live = [d for t in ids for d in s.push(t)]
    choice = engine_for(fmt)._choice(Completion([1], list(ids), [0.0] * len(ids), "stop"), prefix, stop)
    msg, _ = assistant_turn(choice, thinking)
    return live, msg, s.finish(msg)


def accumulate(deltas) -> dict:
    out = {"reasoning_content": "", "content": "", "calls": {}}
    for d in deltas:
        for key in ("reasoning_content", "content"):
            out[key] += d.get(key, "")
        for tc in d.get("tool_calls", ()):
            call = out["calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.get("id", call["id"])
            call["name"] = tc.get("function", {}).get("name", call["name"])
            call["arguments"] += tc.get("function", {}).get("arguments", "")
    return out


def assert_adds_up(live, msg, rest):
    got = accumulate(live + rest)
    assert (got["reasoning_content"] or None) == msg["reasoning_content"]
    assert (got["content"] or None) == msg["content"]
    assert [got["calls"][k] for k in sorted(got["calls"])] == [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in msg["tool_calls"]]


def test_detokenizer_releases_complete_characters_only(fmt):
    ids = fmt.encode_text("héllo 😀 wörld€") + [fmt.special_ids[chat.IM_END]] + fmt.encode_text("ü")
    d, released = Detokenizer(fmt), ""
    for k, t in enumerate(ids):
        released += d.push(t)
        assert released == d.text and "\ufffd" not in released
        assert fmt.decode(ids[: k + 1]).startswith(released)
    assert released == fmt.decode(ids)


@pytest.mark.parametrize("thinking", [True, False])
def test_random_completions_stream_to_the_non_streamed_message(fmt, thinking):
    rng = np.random.default_rng(int(thinking))
    for case in range(400):
        ids = random_ids(fmt, rng, bad_bytes=True)
        prefix = ["", chat.forced_tool_prefix(None, thinking=thinking),
                  chat.forced_tool_prefix("f", thinking=thinking)][case % 3]
        stop = [(), ("b a",), ("é<", "}")][case % 4 % 3]
        live, msg, rest = streamed(fmt, ids, prefix=prefix, thinking=thinking, stop=stop)
        try:
            assert_adds_up(live, msg, rest)
        except AssertionError as e:
            raise AssertionError(f"case {case}: {prefix + fmt.decode(ids)!r} stop={stop}") from e


@pytest.mark.parametrize("text", [
    # a tool section before any </think> ends thinking, unless a </think> follows it: then it was all reasoning
    "abc<|tool_calls_section_begin|>x<|tool_calls_section_end|>def</think>ghi<|im_end|>",
    "abc<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
    "<|tool_calls_section_end|>tail<|im_end|>",
    "<think>re</think>" + WELL_FORMED[len("</think>"):],
    "a</think>b<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{",  # cut
    "x</think>y<|tool_calls_section_begin|>z<|tool_calls_section_end|>w<|tool_calls_section_begin|>v<|im_end|>q",
])
def test_directed_turns(text):
    fmt = chat.byte_chat_format()
    assert_adds_up(*streamed(fmt, fmt.encode_text(text), thinking=True))


def test_well_formed_turn_streams_each_part_as_it_settles(fmt):
    ids = fmt.encode_text("let me think" + WELL_FORMED)
    s, kinds = ChatStream(fmt, thinking=True), []
    for t in ids:
        kinds += [next(iter(d)) for d in s.push(t)]
    # reasoning and content come in many deltas; each call as soon as the next one (or the section end) closes it
    assert kinds.count("reasoning_content") > 1 and kinds.count("content") > 1
    first_call = kinds.index("tool_calls")
    assert kinds[first_call: first_call + 4] == ["tool_calls"] * 4
    live, msg, rest = streamed(fmt, ids)
    assert not rest and len(msg["tool_calls"]) == 2  # everything was streamed before the end
    assert_adds_up(live, msg, rest)


def test_special_tokens_and_partial_markers_never_reach_content(fmt):
    ids = fmt.encode_text("hm</think>a <th") + fmt.encode_text("ink>? <|tool_calls_section_begin|>"
                                                                "<|tool_call_begin|>")
    s = ChatStream(fmt, thinking=True)
    live = [d for t in ids for d in s.push(t)]
    content = "".join(d.get("content", "") for d in live)
    assert content == "a <think>? "  # the plain-text "<think>" is content; nothing of the section is
    assert stable_parts("x</think>y<|tool_calls_section_begin|>z", True) == ("x", "y", [])


def test_thinking_off_stray_end_of_thinking():
    """With thinking off the prompt closed the thinking block: a `</think>` the model writes anyway is content,
    in the stream as in the non-streamed answer (which the stream had already sent part of)."""
    fmt = chat.byte_chat_format()
    live, msg, rest = streamed(fmt, fmt.encode_text("abc</think>def<|im_end|>"), thinking=False)
    assert msg["reasoning_content"] is None and msg["content"] == "abc</think>def"
    assert accumulate(live).get("content") == "abc</think>def" and not rest
    assert_adds_up(live, msg, rest)


def test_completion_text_stream_stops_where_the_answer_is_cut(fmt):
    engine = engine_for(fmt)
    rng = np.random.default_rng(3)
    for case in range(200):
        ids = random_ids(fmt, rng, bad_bytes=True)
        stop = [(), ("b a",), ("é", "x")][case % 3]
        s = TextStream(fmt, stop)
        live = "".join(s.push(t) for t in ids)
        choice = engine._choice(Completion([1], ids, [0.0] * len(ids), "length"), "", stop)
        assert live + s.finish(choice.text) == choice.text
