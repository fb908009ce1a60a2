"""The Kimi K2.5 chat format: conversations to text and token ids (with a loss mask), completions back to messages.

Text: `render_text` writes exactly what K2.5's released `chat_template.jinja` renders through its tokenizer's
`apply_chat_template` (tools deep-sorted and declared in TypeScript, JSON as the fallback), so a checkpoint
loaded from HF chats as it was trained to. It is written as code rather than by running the jinja template so
that the same walk yields, per piece of text, whether the model generates it: that is the loss mask, and the
same pieces give the ids, so text, ids and mask cannot drift apart. tests/data/test_chat.py checks the text
against the released template (tests/data/fixtures/) on many conversations.

Tokens: `ChatFormat` maps the format's special tokens to ids (the released ids from an HF directory's
`tokenizer_config.json`, or reserved ids after the byte tokenizer's specials), expands image and video
placeholders to one pad per merged vision token, and parses generated ids back (`parse_assistant`).
Where each token and rule comes from: BUILD_NOTES.md, "Chat format".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from k25.data.tokenizer import ByteTokenizer, TiktokenTokenizer, Tokenizer
from k25.data.tool_declaration import deep_sort, encode_tools_typescript

Message = dict[str, Any]

IM_USER, IM_ASSISTANT, IM_SYSTEM = "<|im_user|>", "<|im_assistant|>", "<|im_system|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END = "<|media_begin|>", "<|media_content|>", "<|media_pad|>", \
    "<|media_end|>"
IMAGE_MARKER = f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"  # text only: the processor expands it per video chunk
CHAT_TOKENS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, SECTION_BEGIN, SECTION_END, CALL_BEGIN,
               ARG_BEGIN, CALL_END, MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END, THINK, END_THINK)
# The released pre-tokenizer split pattern (tokenization_kimi.py `pat_str`).
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIALS = 256  # the released tokenizer's special slots after the BPE ranks
_ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation the format cannot render; the message names the message index and field."""


# ----------------------------------------------------------------------------------------------------- text
def _content_text(msg: Message, where: str) -> str:
    """The template's `render_content`: strings as is, part lists with one marker line per image/video."""
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise ChatFormatError(f"{where}.content must be a string, a list of parts or null, got {type(c).__name__}")
    out = []
    for j, part in enumerate(c):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url"):
            out.append(IMAGE_MARKER + "\n")
        elif kind in ("video", "video_url"):
            out.append(VIDEO_PLACEHOLDER + "\n")
        elif isinstance(part, dict) and isinstance(part.get("text"), str):  # the template renders any part's text
            out.append(part["text"])
        else:
            raise ChatFormatError(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}} or an "
                                  f"image/image_url/video/video_url part, got {part!r:.80}")
    return "".join(out)


def _tool_calls_text(calls: Sequence[dict], where: str) -> str:
    out = [SECTION_BEGIN]
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise ChatFormatError(f"{where}.tool_calls[{j}] needs an 'id' string and a 'function' object "
                                  "{name, arguments}")
        args = fn.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append(f"{CALL_BEGIN}{call['id']}{ARG_BEGIN}{args}{CALL_END}")
    return "".join(out) + SECTION_END


def generation_prompt(thinking: bool = True) -> tuple[str, str]:
    """(turn header, think prefix) the template appends for `add_generation_prompt`."""
    return f"{IM_ASSISTANT}assistant{IM_MIDDLE}", THINK if thinking else THINK + END_THINK


def render_segments(messages: Sequence[Message], tools: Sequence[dict] | None = None, *,
                    add_generation_prompt: bool = False, thinking: bool = True) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, generated-by-the-model) pieces; their concatenation is `render_text`.

    The generated part of an assistant turn is what the model writes after the generation prompt for the same
    `thinking` flag: everything after `<think>` (thinking) or `<think></think>` (not), through `<|im_end|>`.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatFormatError("messages must be a list of {role, content} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {_ROLES}, got "
                                  f"{m.get('role') if isinstance(m, dict) else m!r:.40}")
    last_plain = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
                     default=-1)
    segs: list[tuple[str, bool]] = []
    if tools:
        tools = deep_sort(list(tools))
        declared = encode_tools_typescript(tools)
        if declared is None:  # the template's fallback: compact JSON
            declared = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
        segs.append((f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{declared}{IM_END}", False))
    think_prefix = generation_prompt(thinking)[1]
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m["role"]
        name = m.get("name") or role
        if role == "assistant":
            segs.append((f"{IM_ASSISTANT}{name}{IM_MIDDLE}", False))
            reasoning = m.get("reasoning_content") or ""  # None renders as empty (see BUILD_NOTES)
            if not isinstance(reasoning, str):
                raise ChatFormatError(f"{where}.reasoning_content must be a string or null")
            body = THINK + (reasoning if i > last_plain and thinking else "") + END_THINK + _content_text(m, where)
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ChatFormatError(f"{where}.tool_calls must be a list")
                body += _tool_calls_text(calls, where)
            segs += [(think_prefix, False), (body[len(think_prefix):] + IM_END, True)]
            continue
        head = {"user": IM_USER}.get(role, IM_SYSTEM) + f"{name}{IM_MIDDLE}"
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ChatFormatError(f"{where} (role tool) needs a 'tool_call_id' string naming the call it answers")
            text = f"## Return of {m['tool_call_id']}\n{_content_text(m, where)}"
        else:
            text = _content_text(m, where)
        segs.append((head + text + IM_END, False))
    if add_generation_prompt:
        segs.append(("".join(generation_prompt(thinking)), False))
    return segs


def render_text(messages: Sequence[Message], tools: Sequence[dict] | None = None, *,
                add_generation_prompt: bool = False, thinking: bool = True) -> str:
    """The text K2.5's released chat template renders for these OpenAI-style messages."""
    return "".join(t for t, _ in render_segments(messages, tools, add_generation_prompt=add_generation_prompt,
                                                 thinking=thinking))


def tool_call_index(messages: Sequence[Message]) -> int:
    """How many tool calls the conversation holds: the next `functions.NAME:IDX` index."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def forced_tool_prefix(name: str | None = None, *, index: int = 0, thinking: bool = True) -> str:
    """Text appended to the generation prompt to force a tool call (`tool_choice` required or named).

    The thinking block is closed first (a call follows `</think>`), then the section opens; a named choice
    also writes the call header up to its arguments, so the model only generates the JSON arguments.
    """
    out = (END_THINK if thinking else "") + SECTION_BEGIN
    if name is not None:
        out += f"{CALL_BEGIN}functions.{name}:{index}{ARG_BEGIN}"
    return out


# ---------------------------------------------------------------------------------------------------- parse
_CALL_ID = re.compile(r"^(?:functions\.)?(?P<name>[^\s:]+):(?P<idx>\d+)$")


def _parse_call(chunk: str) -> tuple[dict, str | None]:
    """One `ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>` chunk -> (call, error or None)."""
    call_id, sep, rest = chunk.partition(ARG_BEGIN)
    call_id = call_id.strip()
    args, ended, tail = rest.partition(CALL_END)
    m = _CALL_ID.match(call_id)
    call = {"id": call_id or None, "type": "function",
            "function": {"name": m.group("name") if m else None, "arguments": args if sep else ""}}
    if not sep:
        return call, "no <|tool_call_argument_begin|> after the call id"
    if not ended:
        return call, "the call is not closed by <|tool_call_end|> (truncated?)"
    if tail.strip():
        return call, f"unexpected text after <|tool_call_end|>: {tail.strip()[:40]!r}"
    if not m:
        return call, f"call id {call_id!r} is not of the form functions.NAME:IDX"
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as e:
        return call, f"arguments are not valid JSON: {e}"
    if not isinstance(parsed, dict):
        return call, f"arguments must be a JSON object, got {type(parsed).__name__}"
    return call, None


def parse_tool_section(section: str) -> tuple[list[dict], list[dict]]:
    """(valid calls, invalid calls with an 'error') of the text inside a tool-call section."""
    valid, invalid = [], []
    head, *chunks = section.split(CALL_BEGIN)
    if head.strip():
        invalid.append({"id": None, "type": "function", "function": {"name": None, "arguments": head},
                        "error": "text before the first <|tool_call_begin|>"})
    for chunk in chunks:
        call, error = _parse_call(chunk)
        if error is None:
            valid.append(call)
        else:
            invalid.append({**call, "error": error})
    return valid, invalid


def split_reasoning(text: str, thinking: bool | None) -> tuple[str | None, str, bool]:
    """(reasoning or None, the text after it, whether a `</think>` closed it) of a completion cut at `<|im_end|>`.

    `thinking` as in `parse_assistant`. Without a `</think>`, thinking-on reasoning runs to a tool section (which
    ends thinking implicitly) or to the end; the stream (`k25.serve.stream`) relies on the flag to hold content
    back until a `</think>` settles it.
    """
    if thinking is False:
        return None, text, False
    if text.startswith(THINK):
        text, thinking = text[len(THINK):], True
    if END_THINK in text:
        reasoning, rest = text.split(END_THINK, 1)
        return reasoning, rest, True
    if not thinking:
        return None, text, False
    cut = text.find(SECTION_BEGIN)
    return (text, "", False) if cut < 0 else (text[:cut], text[cut:], False)


def parse_assistant(text: str, *, thinking: bool | None = None) -> Message:
    """A completion (the text after the generation prompt) -> an OpenAI-style assistant message.

    Returns role, content, reasoning_content, `tool_calls` ({id, type, function{name, arguments}}, arguments as
    the JSON text the model wrote; [] when none) and, when there are any, `invalid_tool_calls` (malformed or
    truncated calls, each with an 'error'; never dropped). `thinking` says whether the prompt opened a thinking block
    (`<think>`): then the text up to `</think>` (or to a tool section, which ends thinking implicitly) is the
    reasoning. False: the prompt closed the block (`<think></think>`), so all of the text is the answer, and a
    `</think>` the model writes anyway stays in the content (as vLLM's kimi_k2 reasoning parser reads it with
    thinking off); this also keeps a streamed answer equal to this one. None: decide from the text (a `</think>`
    or a leading `<think>`).
    """
    reasoning, text, _ = split_reasoning(text.split(IM_END, 1)[0], thinking)
    content, has_section, section = text.partition(SECTION_BEGIN)
    msg: Message = {"role": "assistant", "content": None, "reasoning_content": reasoning or None, "tool_calls": []}
    if has_section:
        section, closed, trailing = section.partition(SECTION_END)
        valid, invalid = parse_tool_section(section)
        if not closed:
            invalid.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""},
                            "error": "the tool-call section is not closed by <|tool_calls_section_end|> "
                                     "(truncated?)"})
        content += trailing
        msg["tool_calls"] = valid
        if invalid:
            msg["invalid_tool_calls"] = invalid
    msg["content"] = content or None
    return msg


_TURN = re.compile(rf"({re.escape(IM_USER)}|{re.escape(IM_ASSISTANT)}|{re.escape(IM_SYSTEM)})(.*?)"
                   rf"{re.escape(IM_MIDDLE)}(.*?){re.escape(IM_END)}", re.S)


def _parse_content(body: str) -> str | list[dict]:
    if IMAGE_MARKER not in body and VIDEO_PLACEHOLDER not in body:
        return body
    parts: list[dict] = []
    for piece in re.split(f"({re.escape(IMAGE_MARKER)}\n|{re.escape(VIDEO_PLACEHOLDER)}\n)", body):
        if piece == IMAGE_MARKER + "\n":
            parts.append({"type": "image"})
        elif piece == VIDEO_PLACEHOLDER + "\n":
            parts.append({"type": "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def parse_text(text: str) -> tuple[list[Message], str | None]:
    """A rendered conversation -> (messages, the tool declaration text or None): `render_text`'s inverse.

    Reasoning the format drops (assistant turns up to the last one without tool calls) comes back empty.
    """
    messages: list[Message] = []
    declared = None
    for tok, name, body in _TURN.findall(text):
        if tok == IM_ASSISTANT:
            msg = parse_assistant(body, thinking=True)
            msg.pop("invalid_tool_calls", None)
        elif tok == IM_USER:
            msg = {"role": "user", "content": _parse_content(body)}
        elif name == "tool_declare":
            declared = body
            continue
        elif name != "system" and body.startswith("## Return of "):  # a system turn's text may read so too
            call_id, _, rest = body[len("## Return of "):].partition("\n")
            msg = {"role": "tool", "tool_call_id": call_id, "content": _parse_content(rest)}
        else:
            msg = {"role": "system", "content": _parse_content(body)}
        if name != msg["role"]:
            msg["name"] = name
        messages.append(msg)
    return messages, declared


# --------------------------------------------------------------------------------------------------- tokens
@dataclasses.dataclass
class ChatTokens:
    """Token ids of a rendered conversation and a loss mask (1 on tokens the model generates)."""

    ids: list[int]
    loss_mask: list[int]


class ChatFormat:
    """The chat format over one tokenizer: special tokens as single ids, media placeholders expanded.

    `special_ids` maps every name in CHAT_TOKENS to its id; `video_pad_id` is the id video-chunk placeholders
    take (K2.5 splices video tokens at an id past the text vocabulary, `video_token_id`).
    """

    def __init__(self, tokenizer: Tokenizer, special_ids: Mapping[str, int], *, video_pad_id: int | None = None):
        missing = [t for t in CHAT_TOKENS if t not in special_ids]
        if missing:
            raise ValueError(f"the tokenizer has no id for chat special token(s) {missing}")
        self.tokenizer = tokenizer
        self.special_ids = {t: int(special_ids[t]) for t in CHAT_TOKENS}
        self.video_pad_id = video_pad_id
        self._names = {v: k for k, v in self.special_ids.items()}
        names = sorted(self.special_ids, key=len, reverse=True) + [VIDEO_PLACEHOLDER]
        self._split = re.compile("(" + "|".join(re.escape(t) for t in names) + ")")

    # ids of the format's control tokens
    @property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END]

    @property
    def image_pad_id(self) -> int:
        return self.special_ids[MEDIA_PAD]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn."""
        return (self.im_end_id,)

    @property
    def max_id(self) -> int:
        return max(max(self.special_ids.values()), self.video_pad_id or 0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a model with `vocab_size` embeddings cannot take every id the format writes."""
        top = max(self.special_ids.values())
        if top >= vocab_size:
            raise ValueError(f"the chat format's special tokens need ids up to {top}, but the model's vocab_size is "
                             f"{vocab_size}; train the model with vocab_size >= {top + 1} (the byte tokenizer with "
                             f"chat specials needs {ByteTokenizer(chat=True).vocab_size}).")

    def encode_text(self, text: str, *, media_tokens: list[int] | None = None,
                    video_chunks: list[Sequence[tuple[str, int]]] | None = None) -> list[int]:
        """Ids of text in which chat special tokens are single ids.

        `media_tokens` (consumed from the front) gives the number of merged vision tokens of each image in
        order: its `<|media_pad|>` becomes that many pads. A video placeholder takes the next entry of
        `video_chunks`: (timestamp, tokens) per chunk, written as the HF processor writes it.
        """
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece == VIDEO_PLACEHOLDER:
                if not video_chunks or self.video_pad_id is None:
                    raise ChatFormatError("a video part needs its chunks (video_chunks: (timestamp, tokens) per "
                                          "chunk) and a format with video_pad_id to be tokenized")
                for stamp, n in video_chunks.pop(0):
                    ids += self.tokenizer.encode(stamp) + [self.special_ids[MEDIA_BEGIN]] + \
                        self.tokenizer.encode("video") + [self.special_ids[MEDIA_CONTENT]] + \
                        [self.video_pad_id] * int(n) + [self.special_ids[MEDIA_END]]
            elif piece == MEDIA_PAD and media_tokens is not None:
                if not media_tokens:
                    raise ChatFormatError("the conversation has more images than image_tokens has entries")
                ids += [self.special_ids[piece]] * int(media_tokens.pop(0))
            elif piece in self.special_ids:
                ids.append(self.special_ids[piece])
            else:
                ids += self.tokenizer.encode(piece)
        return ids

    def encode(self, messages: Sequence[Message], tools: Sequence[dict] | None = None, *,
               add_generation_prompt: bool = False, thinking: bool = True,
               image_tokens: Sequence[int] | None = None,
               video_chunks: Sequence[Sequence[tuple[str, int]]] | None = None) -> ChatTokens:
        """Ids and loss mask of the rendered conversation (mask 1 on the generated part of assistant turns).

        `image_tokens`: merged vision tokens per image (grid t*h*w / merge^2), in order of appearance; without
        it each image keeps the template's single `<|media_pad|>`.
        """
        media = list(image_tokens) if image_tokens is not None else None
        chunks = [list(c) for c in video_chunks] if video_chunks is not None else None
        ids: list[int] = []
        mask: list[int] = []
        for text, generated in render_segments(messages, tools, add_generation_prompt=add_generation_prompt,
                                               thinking=thinking):
            piece = self.encode_text(text, media_tokens=media, video_chunks=chunks)
            ids += piece
            mask += [int(generated)] * len(piece)
        if media:
            raise ChatFormatError(f"image_tokens has {len(media)} more entr(ies) than the conversation has images")
        return ChatTokens(ids, mask)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids with special tokens written out (so `parse_assistant` can read it)."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._names:
                if run:
                    out.append(self.tokenizer.decode(run))
                    run = []
                out.append(self._names[i])
            else:
                run.append(i)
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)

    def parse(self, completion_ids: Sequence[int], *, thinking: bool | None = True, prefix: str = "") -> Message:
        """Generated ids (after the generation prompt, plus any forced `prefix` text) -> assistant message."""
        return parse_assistant(prefix + self.decode(completion_ids), thinking=thinking)


def byte_chat_format() -> ChatFormat:
    """The format on the byte tokenizer: chat specials at reserved ids after the byte specials (vocab 278).

    `<|media_pad|>` is the byte tokenizer's `<|media|>` (the id the vision path splices, as in joint
    training) and video chunks use `<|reserved_0|>`, the joint stage's video id.
    """
    tok = ByteTokenizer(chat=True)
    ids = {**tok.special_ids, MEDIA_PAD: tok.special_ids["<|media|>"]}
    return ChatFormat(tok, ids, video_pad_id=tok.special_ids["<|reserved_0|>"])


def released_special_ids(tokenizer_config: Mapping[str, Any], num_ranks: int) -> dict[str, int]:
    """Special-token ids as the released tokenizer assigns them: the 256 slots after the BPE ranks, named by
    `added_tokens_decoder` and `<|reserved_token_{i}|>` otherwise."""
    named = {int(k): v["content"] if isinstance(v, dict) else str(v)
             for k, v in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(num_ranks, num_ranks + NUM_RESERVED_SPECIALS)}


def hf_chat_format(path: str) -> ChatFormat:
    """The format of a released HF directory (`tiktoken.model` + `tokenizer_config.json`, as Kimi ships them)."""
    vocab, cfg_path = os.path.join(path, "tiktoken.model"), os.path.join(path, "tokenizer_config.json")
    for f in (vocab, cfg_path):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{path} has no {os.path.basename(f)}; the Kimi chat format needs the released "
                                    "tiktoken.model and tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    with open(vocab, "rb") as f:
        num_ranks = sum(1 for line in f if line.strip())
    ids = released_special_ids(tok_cfg, num_ranks)
    tok = TiktokenTokenizer(vocab, pattern=KIMI_PATTERN, special_tokens=ids)
    video = num_ranks + NUM_RESERVED_SPECIALS  # K2.5's video_token_id sits right past the vocabulary
    model_cfg = os.path.join(path, "config.json")
    if os.path.exists(model_cfg):
        with open(model_cfg) as f:
            video = json.load(f).get("video_token_id", video)
    return ChatFormat(tok, ids, video_pad_id=video)


def load_chat_format(spec: str) -> ChatFormat:
    """`"byte"`, or a directory with the released tokenizer files."""
    if spec == "byte":
        return byte_chat_format()
    if os.path.isdir(spec):
        return hf_chat_format(spec)
    raise ValueError(f"chat format spec {spec!r}: use 'byte' or an HF directory holding tiktoken.model and "
                     "tokenizer_config.json")
