"""Streamed responses as the sampler produces them: text released in complete characters, chat deltas that are
never taken back.

`Detokenizer` turns a growing list of ids into the text `ChatFormat.decode` writes for them (special tokens
written out), released only in complete characters: a byte-level or BPE token that ends inside a multi-byte
character waits for the token that completes it (vLLM's incremental detokenization: the delta is the decode
of a short window of ids minus the decode of its already released head, held back while it ends in U+FFFD).

`TextStream` (/v1/completions) and `ChatStream` (/v1/chat/completions) hold back text a later token could still
change: the tail that may be the start of a stop string (the non-streamed answer is cut at the first stop
string) and, for chat, the start of a chat special token written as plain text. A chat delta is released only
where `k25.data.chat.parse_assistant` reads the text the same whatever follows: reasoning up to `</think>`,
content outside the tool-call section, and a tool call once the next call or the section's end closes it
(parsed by the format's own parser). When the choice ends, `finish(...)` sends what the non-streamed answer
holds beyond what was streamed, so the streamed reasoning, content and tool calls add up to the non-streamed
message exactly. With thinking off there is no reasoning: a `</think>` the model writes anyway is content in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from k25.data import chat as chat_fmt
from k25.data.chat import ChatFormat

_REPLACEMENT = "\ufffd"
# Texts whose first characters the chat parse must not see alone: a later token may complete them.
_CHAT_MARKERS = (chat_fmt.THINK, chat_fmt.END_THINK, chat_fmt.IM_END, chat_fmt.SECTION_BEGIN, chat_fmt.SECTION_END,
                 chat_fmt.CALL_BEGIN, chat_fmt.ARG_BEGIN, chat_fmt.CALL_END)


class Detokenizer:
    """Text of a growing id sequence, as `ChatFormat.decode` writes it, released in complete characters."""

    def __init__(self, chat: ChatFormat):
        self.tokenizer = chat.tokenizer
        self.names = {i: name for name, i in chat.special_ids.items()}
        self.text = ""  # released so far
        self._run: list[int] = []  # ids since the last special token (decoded together, as decode does)
        self._run_text = ""  # the released text of the run
        self._head = self._read = 0  # decode(run[head:read]) is released; the window restarts at head

    def push(self, token: int) -> str:
        """Add one id; returns the newly released text."""
        name = self.names.get(int(token))
        if name is not None:  # decode writes the run before a special as it stands, then the special's name
            tail = self.tokenizer.decode(self._run)[len(self._run_text):] if self._run else ""
            self._run, self._run_text, self._head, self._read = [], "", 0, 0
            self.text += tail + name
            return tail + name
        self._run.append(int(token))
        done = self.tokenizer.decode(self._run[self._head:self._read])
        now = self.tokenizer.decode(self._run[self._head:])
        if len(now) <= len(done) or now.endswith(_REPLACEMENT):  # nothing new, or a character still incomplete
            return ""
        delta = now[len(done):]
        self._head, self._read = self._read, len(self._run)
        self._run_text += delta
        self.text += delta
        return delta


def settled(text: str, start: int, stop: Sequence[str], markers: Sequence[str] = ()) -> int:
    """How much of `text` no later text can change: up to the first stop string found at or after `start`, and
    short of a tail that may begin a stop string or a marker."""
    end = len(text)
    hits = [text.find(s, start) for s in stop if s]
    hits = [h for h in hits if h >= 0]
    if hits:
        end = min(hits)
    hold = 0
    for s in (*stop, *markers):
        if s[0] not in text[-(len(s) - 1):]:  # (fast path) no tail can start it
            continue
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return min(end, len(text) - hold)


class TextStream:
    """Text deltas of one /v1/completions choice."""

    def __init__(self, chat: ChatFormat, stop: Sequence[str] = ()):
        self.text = Detokenizer(chat)
        self.stop = [s for s in stop if s]
        self.sent = ""

    def push(self, token: int) -> str:
        self.text.push(token)
        t = self.text.text
        return self._delta(t[:settled(t, 0, self.stop)])

    def finish(self, text: str) -> str:
        """The rest of the choice's final text (the non-streamed `text`)."""
        return self._delta(text)

    def _delta(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def stable_parts(text: str, thinking: bool) -> tuple[str, str, list[dict]]:
    """(reasoning, content, tool calls) of a completion's text so far that `parse_assistant` keeps as they are
    (as prefixes, for the strings) whatever text follows. With thinking off everything is content, as there."""
    if chat_fmt.IM_END in text:  # the turn is over: nothing after it counts
        msg = chat_fmt.parse_assistant(text, thinking=thinking)
        return msg["reasoning_content"] or "", msg["content"] or "", msg["tool_calls"]
    reasoning, rest, ended = chat_fmt.split_reasoning(text, thinking)
    if thinking and not ended:  # content only once a `</think>` settles where the reasoning ends
        return reasoning or "", "", []
    content, opened, section = rest.partition(chat_fmt.SECTION_BEGIN)
    calls: list[dict] = []
    if opened:
        body, closed, trailing = section.partition(chat_fmt.SECTION_END)
        if closed:
            content += trailing
        else:  # a call is complete once the next one begins
            body = body[:max(body.rfind(chat_fmt.CALL_BEGIN), 0)]
        calls = chat_fmt.parse_tool_section(body)[0]
    return reasoning or "", content, calls


class ChatStream:
    """Deltas (`reasoning_content`, `content`, `tool_calls`) of one streamed chat choice."""

    def __init__(self, chat: ChatFormat, *, prefix: str = "", thinking: bool = True, stop: Sequence[str] = ()):
        self.text = Detokenizer(chat)
        self.prefix, self.thinking = prefix, thinking
        self.stop = [s for s in stop if s]
        self.sent = {"reasoning_content": "", "content": ""}
        self.calls = 0

    def push(self, token: int) -> list[dict]:
        """Add one sampled id; returns the deltas it settles (often none)."""
        if not self.text.push(token):
            return []
        t = self.prefix + self.text.text
        return self._deltas(*stable_parts(t[:settled(t, len(self.prefix), self.stop, _CHAT_MARKERS)], self.thinking))

    def finish(self, message: dict[str, Any]) -> list[dict]:
        """The deltas that complete the streamed turn to `message` (the non-streamed assistant message)."""
        return self._deltas(message.get("reasoning_content") or "", message.get("content") or "",
                            message.get("tool_calls") or [])

    def _deltas(self, reasoning: str, content: str, calls: list[dict]) -> list[dict]:
        out = []
        for key, text in (("reasoning_content", reasoning), ("content", content)):
            sent = self.sent[key]
            if len(text) > len(sent) and text.startswith(sent):
                out.append({key: text[len(sent):]})
                self.sent[key] = text
        for call in calls[self.calls:]:
            fn = call["function"]
            out.append({"tool_calls": [{"index": self.calls, "id": call["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": self.calls, "function": {"arguments": fn["arguments"]}}]})
            self.calls += 1
        return out
