"""The Kimi K2.5 chat format against the released chat template, round trips, token ids and loss masks."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
from chat_fixtures import write_synthetic_kimi_tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from k25.data import chat
from k25.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, TiktokenTokenizer
from k25.data.tool_declaration import deep_sort, encode_tools_typescript

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TEMPLATE = open(os.path.join(FIXTURES, "kimi_k25_chat_template.jinja")).read()
TOOL_CASES = json.load(open(os.path.join(FIXTURES, "kimi_k25_tools.json")))["cases"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "required": ["city"], "properties": {
                                                "city": {"type": "string", "description": "City name"},
                                                "unit": {"enum": ["c", "f"], "default": "c"}}}}}


def reference(messages, tools=None, *, add_generation_prompt=False, thinking=True) -> str:
    """The released template through transformers' jinja machinery, called as tokenization_kimi.py does."""
    kwargs = {}
    if tools:
        tools = deep_sort(tools)
        ts = encode_tools_typescript(tools)
        if ts is not None:
            kwargs["tools_ts_str"] = ts
    # A null reasoning_content renders as the string "None" in the template; the format treats it as absent.
    messages = [{k: v for k, v in m.items() if not (k == "reasoning_content" and v is None)} for m in messages]
    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=TEMPLATE,
                                        add_generation_prompt=add_generation_prompt, thinking=thinking, **kwargs)
    return rendered[0]


def call(name, idx, args, as_string=True):
    return {"id": f"functions.{name}:{idx}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}}


TEXTS = ["hi", "", "  spaces  ", "多语言 text ✓", "line1\nline2\n", "<b>html</b> & \"quotes\"", "## Return of x"]


def random_conversation(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(TEXTS)})
    n_calls = 0
    for _ in range(rng.randint(1, 4)):
        content = rng.choice(TEXTS)
        if rng.random() < 0.3:
            content = [{"type": "text", "text": rng.choice(TEXTS)}, {"type": rng.choice(["image", "image_url"])},
                       {"type": "text", "text": "what is this?"}]
        user = {"role": "user", "content": content}
        if rng.random() < 0.2:
            user["name"] = "alice"
        msgs.append(user)
        for _ in range(rng.randint(0, 2)):  # tool rounds
            calls = [call(rng.choice(["get_weather", "search"]), n_calls + j, {"city": rng.choice(TEXTS)},
                          as_string=rng.random() < 0.7) for j in range(rng.randint(1, 3))]
            n_calls += len(calls)
            msgs.append({"role": "assistant", "content": rng.choice(["", None, "Let me check."]),
                         "reasoning_content": rng.choice([None, "", "thinking about tools"]), "tool_calls": calls})
            for c in calls:
                msgs.append({"role": "tool", "tool_call_id": c["id"], "content": rng.choice(TEXTS)})
        if rng.random() < 0.8:
            final = {"role": "assistant", "content": rng.choice(TEXTS)}
            if rng.random() < 0.7:
                final["reasoning_content"] = rng.choice(["because", None, "多步推理\n..."])
            msgs.append(final)
    tools = None
    if rng.random() < 0.5:
        tools = [WEATHER] + ([TOOL_CASES[rng.randrange(len(TOOL_CASES))]["tools"][0]] if rng.random() < 0.5 else [])
    return msgs, tools


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c["name"] for c in TOOL_CASES])
def test_typescript_tool_declaration_matches_released_encoder(case):
    assert encode_tools_typescript(case["tools"]) == case["expected"]


def test_render_text_equals_released_template_on_many_conversations():
    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        msgs, tools = random_conversation(rng)
        for gen in (False, True):
            for thinking in (True, False):
                got = chat.render_text(msgs, tools, add_generation_prompt=gen, thinking=thinking)
                assert got == reference(msgs, tools, add_generation_prompt=gen, thinking=thinking), msgs
                checked += 1
    assert checked == 600


def test_render_text_fixed_cases():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "use the tool",
             "tool_calls": [call("get_weather", 0, {"city": "Paris"}), call("get_weather", 1, {"city": "Rome"})]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "rain"}]
    text = chat.render_text(msgs, [WEATHER], add_generation_prompt=True)
    assert text == reference(msgs, [WEATHER], add_generation_prompt=True)
    assert text.startswith("<|im_system|>tool_declare<|im_middle|># Tools\n\n## functions\nnamespace functions {")
    assert ("<|im_assistant|>assistant<|im_middle|><think>use the tool</think><|tool_calls_section_begin|>"
            "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}"
            "<|tool_call_end|><|tool_call_begin|>functions.get_weather:1") in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>" in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|><think>")
    # no declaration without function tools: the template's JSON fallback
    other = [{"type": "retrieval", "name": "x"}]
    assert chat.render_text(msgs[:1], other) == reference(msgs[:1], other)
    assert '<|im_middle|>[{"name":"x","type":"retrieval"}]<|im_end|>' in chat.render_text(msgs[:1], other)


def test_bad_messages_name_the_field():
    with pytest.raises(chat.ChatFormatError, match=r"messages\[0\].role"):
        chat.render_text([{"role": "robot", "content": "x"}])
    with pytest.raises(chat.ChatFormatError, match=r"messages\[1\].*tool_call_id"):
        chat.render_text([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    other_part = [{"role": "user", "content": [{"type": "input_text", "text": "as text"}]}]
    assert chat.render_text(other_part) == reference(other_part)
    with pytest.raises(chat.ChatFormatError, match=r"messages\[0\].content\[0\]"):
        chat.render_text([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(chat.ChatFormatError, match=r"tool_calls\[0\]"):
        chat.render_text([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}])


def normalized(msgs):
    """Messages as the format keeps them: reasoning only after the last plain assistant turn, empty -> None."""
    last_plain = max((i for i, m in enumerate(msgs) if m["role"] == "assistant" and not m.get("tool_calls")),
                     default=-1)
    out = []
    for i, m in enumerate(msgs):
        m = copy.deepcopy(m)
        if m["role"] == "assistant":
            m["reasoning_content"] = (m.get("reasoning_content") or None) if i > last_plain else None
            m["content"] = m.get("content") or None
            for c in m.get("tool_calls") or ():
                if not isinstance(c["function"]["arguments"], str):
                    c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
            m["tool_calls"] = m.get("tool_calls") or []
        if isinstance(m.get("content"), list):
            m["content"] = [{"type": "image"} if p["type"].startswith("image") else p for p in m["content"]
                            if p.get("text") != ""]
        out.append(m)
    return out


def test_render_parse_round_trip_keeps_parallel_calls_and_thinking():
    rng = random.Random(1)
    for _ in range(100):
        msgs, tools = random_conversation(rng)
        text = chat.render_text(msgs, tools)
        back, declared = chat.parse_text(text)
        assert back == normalized(msgs)
        assert chat.render_text(back, tools) == text
        assert (declared is not None) == bool(tools)


def test_completion_round_trip_through_generation_prompt():
    """prompt + completion text == the rendered conversation with the new assistant turn (TITO consistency)."""
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    turn = {"role": "assistant", "content": "Checking both.", "reasoning_content": "two cities, two calls",
            "tool_calls": [call("get_weather", 0, {"city": "Paris"}), call("get_weather", 1, {"city": "Rome"})]}
    for thinking in (True, False):
        prompt = chat.render_text(msgs, [WEATHER], add_generation_prompt=True, thinking=thinking)
        full = chat.render_text(msgs + [turn], [WEATHER], thinking=thinking)
        completion = full[len(prompt):]
        assert full.startswith(prompt) and completion.endswith("<|im_end|>")
        parsed = chat.parse_assistant(completion, thinking=thinking)
        want = dict(turn, reasoning_content=turn["reasoning_content"] if thinking else None)
        assert parsed == want


def test_parse_reports_malformed_calls():
    text = ("</think>ok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
            '{"a": 1}<|tool_call_end|><|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{"a": '
            "<|tool_call_end|><|tool_call_begin|>bad id<|tool_call_argument_begin|>{}<|tool_call_end|>"
            "<|tool_call_begin|>functions.h:2<|tool_call_argument_begin|>[1]<|tool_call_end|>"
            "<|tool_call_begin|>functions.k:3<|tool_call_argument_begin|>{\"x\"")
    msg = chat.parse_assistant(text, thinking=True)
    assert msg["content"] == "ok" and msg["reasoning_content"] is None
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f"]
    errors = [c["error"] for c in msg["invalid_tool_calls"]]
    assert len(errors) == 5
    assert "not valid JSON" in errors[0] and "functions.NAME:IDX" in errors[1] and "JSON object" in errors[2]
    assert "truncated" in errors[3] and "section is not closed" in errors[4]
    assert msg["invalid_tool_calls"][0]["id"] == "functions.g:1"
    # thinking interrupted by a tool section, and truncated thinking
    msg = chat.parse_assistant("hmm<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
                               "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
                               thinking=True)
    assert msg["reasoning_content"] == "hmm" and msg["tool_calls"][0]["id"] == "functions.f:0"
    assert chat.parse_assistant("still thinking", thinking=True) == {
        "role": "assistant", "content": None, "reasoning_content": "still thinking", "tool_calls": []}
    assert chat.parse_assistant("plain", thinking=False)["content"] == "plain"
    # thinking off: the prompt closed the block, so think tags the model writes anyway are content
    for text in ("a</think>b", "<think>a</think>b"):
        msg = chat.parse_assistant(text + "<|im_end|>", thinking=False)
        assert msg["content"] == text and msg["reasoning_content"] is None
    assert chat.parse_assistant("a</think>b", thinking=None)["reasoning_content"] == "a"


def test_forced_tool_prefix_is_the_start_of_a_call():
    msgs = [{"role": "user", "content": "x"}]
    prompt = chat.render_text(msgs, [WEATHER], add_generation_prompt=True)
    prefix = chat.forced_tool_prefix("get_weather", index=chat.tool_call_index(msgs))
    turn = {"role": "assistant", "content": None, "tool_calls": [call("get_weather", 0, {"city": "Oslo"})]}
    full = chat.render_text(msgs + [turn], [WEATHER])
    assert full.startswith(prompt + prefix)
    generated = full[len(prompt + prefix):]
    assert chat.parse_assistant(prefix + generated, thinking=True)["tool_calls"] == turn["tool_calls"]


# --------------------------------------------------------------------------------------------------- tokens
def test_byte_format_ids_and_loss_mask():
    fmt = chat.byte_chat_format()
    base = ByteTokenizer()
    assert all(fmt.tokenizer.special_ids[t] == base.special_ids[t] for t in SPECIAL_TOKENS)  # ids stable
    assert fmt.tokenizer.vocab_size == 278 and fmt.image_pad_id == base.media_id
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "", "reasoning_content": "add",
             "tool_calls": [call("calc", 0, {"e": "2+2"})]},
            {"role": "tool", "tool_call_id": "functions.calc:0", "content": "4"},
            {"role": "assistant", "content": "4", "reasoning_content": "dropped"}]
    out = fmt.encode(msgs)
    assert fmt.decode(out.ids) == chat.render_text(msgs)
    trained = fmt.decode([i for i, m in zip(out.ids, out.loss_mask) if m])
    # the tool-call turn precedes the last plain assistant turn, so the format drops its reasoning too
    assert trained == ('</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calc:0'
                       '<|tool_call_argument_begin|>{"e": "2+2"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
                       '</think>4<|im_end|>')
    # each special token is one id, and the mask is 0 on prompt, tool output and the generation prompt
    assert out.ids.count(fmt.im_end_id) == 5 and sum(out.loss_mask) == len(fmt.encode_text(trained))
    assert fmt.encode(msgs, thinking=False).loss_mask != out.loss_mask
    gen = fmt.encode(msgs[:2], add_generation_prompt=True)
    assert sum(gen.loss_mask) == 0 and fmt.decode(gen.ids).endswith("<|im_assistant|>assistant<|im_middle|><think>")
    with pytest.raises(ValueError, match="vocab_size >= 278"):
        fmt.check_vocab(272)
    fmt.check_vocab(278)


def test_media_placeholders_expand_per_merged_token():
    fmt = chat.byte_chat_format()
    msgs = [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "and"},
                                         {"type": "image"}, {"type": "video"}]}]
    grids = [(1, 4, 6), (1, 2, 2)]
    out = fmt.encode(msgs, image_tokens=[t * h * w // 4 for t, h, w in grids],
                     video_chunks=[[("00:00:00.000", 3), ("00:00:02.000", 3)]])
    assert out.ids.count(fmt.image_pad_id) == 6 + 1
    assert out.ids.count(fmt.video_pad_id) == 6
    text = fmt.decode(out.ids)
    assert text.count("<|media_begin|>image<|media_content|>") == 2 and text.count("<|media_begin|>video") == 2
    assert "00:00:02.000<|media_begin|>video<|media_content|>" in text
    assert fmt.encode(msgs[:1][:0] + [{"role": "user", "content": "x"}]).ids  # no media, no arguments needed
    with pytest.raises(chat.ChatFormatError, match="video_chunks"):
        fmt.encode(msgs)
    with pytest.raises(chat.ChatFormatError, match="more images"):
        fmt.encode(msgs, image_tokens=[6], video_chunks=[[("0", 1)]])
    with pytest.raises(chat.ChatFormatError, match="more entr"):
        fmt.encode(msgs[:0] + [{"role": "user", "content": "x"}], image_tokens=[4])


def test_released_tokenizer_files_give_released_ids(tmp_path):
    n = write_synthetic_kimi_tokenizer(str(tmp_path))
    fmt = chat.load_chat_format(str(tmp_path))
    assert isinstance(fmt.tokenizer, TiktokenTokenizer)
    # with 163584 ranks these are the released ids 163586 (<|im_end|>) ... 163605 (<|media_pad|>), 163607
    assert fmt.im_end_id == n + 2 and fmt.special_ids["<|im_middle|>"] == n + 17
    assert fmt.image_pad_id == n + 21 and fmt.special_ids["</think>"] == n + 23
    assert fmt.video_pad_id == n + 256 and fmt.tokenizer.vocab_size == n + 256
    assert fmt.tokenizer.bos_id == n and fmt.tokenizer.pad_id == n + 255
    msgs = [{"role": "user", "content": "in the theater"}, {"role": "assistant", "content": "the end"}]
    out = fmt.encode(msgs)
    assert fmt.decode(out.ids) == chat.render_text(msgs)
    assert out.ids[:1] == [n + 3] and fmt.tokenizer.encode(" the") == [n - 3]  # merged BPE pieces are used
    assert fmt.decode([i for i, m in zip(out.ids, out.loss_mask) if m]) == "</think>the end<|im_end|>"
    fmt.check_vocab(n + 256)
    with pytest.raises(ValueError, match="vocab_size"):
        fmt.check_vocab(n + 10)
