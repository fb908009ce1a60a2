"""What the server does per request, apart from HTTP: chat prompt -> token ids -> the sampler -> choices.

Every generation is one `await sampler.submit(Request)` on the sampler's continuous batch (n choices are n
requests); a streamed one iterates `sampler.stream(Request)` instead and hands each sampled token to the route
(`on_token`) as it comes, through the same `generate` (so a subclass that records generations sees both).
`tool_choice` required or named is enforced by appending the start of a tool call to the generation prompt
(k25.data.chat.forced_tool_prefix): the model then writes the call (for a named choice, only its JSON
arguments); `none` keeps the tools declared but stops generation at the tool-call section.
Stop strings cut the text and the token ids at the first match (the sampler stops on ids only).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from k25.data import chat as chat_fmt
from k25.data.chat import ChatFormat, ChatFormatError
from k25.infer import Completion, Request, Sampler, Token


class BadRequest(ValueError):
    """Input the server rejects: answered with `status` and an OpenAI-style error naming `param`."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass
class Choice:
    """One generated choice: the sampler's completion plus its text and the forced prefix it continues."""

    completion: Completion
    token_ids: list[int]  # after stop-string truncation
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str  # prefix + decoded completion (special tokens written out), cut at a stop string
    finish_reason: str


@dataclasses.dataclass
class ChatPrompt:
    ids: list[int]
    prefix: str  # forced text after the generation prompt (part of ids), parsed with the completion
    thinking: bool
    stop_ids: tuple[int, ...]
    tool_choice_none: bool
    media: dict[str, Any]


def assistant_turn(choice: Choice, thinking: bool) -> tuple[dict, str]:
    """(OpenAI assistant message, finish_reason) of a chat choice; a completed turn with calls is 'tool_calls'."""
    msg = chat_fmt.parse_assistant(choice.text, thinking=thinking)
    reason = "tool_calls" if msg.get("tool_calls") and choice.finish_reason == "stop" else choice.finish_reason
    return msg, reason


def decode_data_uri(url: str, where: str) -> np.ndarray:
    """An image data URI as an RGB uint8 array; anything else (a URL to fetch, bad base64) is a BadRequest."""
    from PIL import Image

    if not url.startswith("data:"):
        raise BadRequest(f"{where}: only data URIs (data:image/...;base64,...) are accepted; the server does not "
                         "fetch URLs", param=where)
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise BadRequest(f"{where}: the data URI must be base64 encoded", param=where)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        return np.asarray(image.convert("RGB"))
    except (binascii.Error, ValueError, OSError) as e:
        raise BadRequest(f"{where}: cannot decode the image ({e})", param=where) from e


def image_media(images: Sequence[np.ndarray], vision_config: Any) -> tuple[dict[str, Any], list[int]]:
    """The sampler's media arguments for RGB images (the HF processor's arrays at the model's patch size and
    merge) and the merged LLM tokens, i.e. placeholders, of each; shared by the chat and raw prompts."""
    from k25.data.preprocess import preprocess_images

    px = preprocess_images(images, patch_size=vision_config.patch_size, merge_size=vision_config.merge_kernel_size[0])
    grids = [tuple(int(v) for v in g) for g in px["image_grid_thw"]]
    merge = vision_config.merge_kernel_size[0] * vision_config.merge_kernel_size[1]
    return {"pixel_values": px["pixel_values"], "grid_thw": grids}, [t * h * w // merge for t, h, w in grids]


class Engine:
    """The served model: a sampler and the chat format of its tokenizer."""

    def __init__(self, sampler: Sampler, chat: ChatFormat, *, model_name: str):
        chat.check_vocab(sampler.vocab_size)
        self.sampler, self.chat, self.model_name = sampler, chat, model_name
        self.max_len = sampler.max_len
        self.multimodal = sampler.multimodal

    # --------------------------------------------------------------------------------------- prompts
    def _images(self, messages: Sequence[dict]) -> tuple[list[dict], dict[str, Any], list[int]]:
        """Messages with image parts normalized, the processor arrays and the merged tokens per image."""
        images, out = [], []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                out.append(m)
                continue
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind in ("image_url", "image"):
                    where = f"messages[{i}].content[{j}].image_url"
                    url = p.get("image_url", {}).get("url") if isinstance(p.get("image_url"), dict) else \
                        p.get("image_url") or p.get("image")
                    if not isinstance(url, str):
                        raise BadRequest(f"{where}.url must be a data URI string", param=where)
                    images.append(decode_data_uri(url, where))
                    parts.append({"type": "image_url"})
                elif kind in ("video", "video_url"):
                    raise BadRequest(f"messages[{i}].content[{j}]: video input is not served; send frames as images",
                                     param=f"messages[{i}].content")
                else:
                    parts.append(p)
            out.append({**m, "content": parts})
        if not images:
            return out, {}, []
        if not self.multimodal:
            raise BadRequest(f"model {self.model_name!r} is text-only and cannot take images", param="messages")
        return (out, *image_media(images, self.sampler.cfg.vision_config))

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None, tool_choice: Any,
                    template_kwargs: dict | None) -> ChatPrompt:
        # OpenAI's API takes "developer" as the system role of newer models, and clients (inspect_ai, the
        # openai SDK's newer defaults) send it; the chat format renders it as the system turn it stands for
        messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                    for m in messages]
        kwargs = dict(template_kwargs or {})
        unknown = set(kwargs) - {"thinking"}
        if unknown:
            raise BadRequest(f"chat_template_kwargs: unknown key(s) {sorted(unknown)}; the format takes 'thinking'",
                             param="chat_template_kwargs")
        thinking = kwargs.get("thinking", True)
        if not isinstance(thinking, bool):
            raise BadRequest("chat_template_kwargs.thinking must be true or false", param="chat_template_kwargs")
        names = [t.get("function", {}).get("name") for t in tools or () if isinstance(t, dict)]
        prefix, none = "", False
        if tool_choice is not None and not tools and tool_choice != "none":
            raise BadRequest("tool_choice needs 'tools'", param="tool_choice")
        if tool_choice == "required":
            prefix = chat_fmt.forced_tool_prefix(None, thinking=thinking)
        elif tool_choice == "none":
            none = True
        elif isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
            if name not in names:
                raise BadRequest(f"tool_choice names function {name!r}, which is not among the tools {names}",
                                 param="tool_choice")
            prefix = chat_fmt.forced_tool_prefix(name, index=chat_fmt.tool_call_index(messages), thinking=thinking)
        messages, media, image_tokens = self._images(messages)
        try:
            ids = self.chat.encode(messages, tools, add_generation_prompt=True, thinking=thinking,
                                   image_tokens=image_tokens or None).ids
        except ChatFormatError as e:
            raise BadRequest(str(e), param="messages") from e
        ids += self.chat.encode_text(prefix)
        stop = self.chat.stop_ids + ((self.chat.special_ids[chat_fmt.SECTION_BEGIN],) if none else ())
        return ChatPrompt(ids, prefix, thinking, stop, none, media)

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.chat.encode_text(prompt)
        return [int(t) for t in prompt]

    # ------------------------------------------------------------------------------------ generation
    def check_length(self, n_prompt: int, max_tokens: int | None) -> int:
        """max new tokens for this prompt, or a 400 naming the context limit."""
        room = self.max_len - n_prompt
        if room < 1:
            raise BadRequest(f"the prompt has {n_prompt} tokens, but this model's context is {self.max_len} tokens "
                             f"(prompt + completion); shorten the prompt", param="messages",
                             code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise BadRequest(f"the prompt has {n_prompt} tokens and max_tokens={max_tokens}: {n_prompt + max_tokens} "
                             f"exceeds this model's context of {self.max_len} tokens; lower max_tokens to at most "
                             f"{room}", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    async def generate(self, prompt_ids: list[int], *, n: int, max_tokens: int, temperature: float | None,
                       top_p: float | None, top_k: int | None, seed: int | None, stop_ids: Sequence[int],
                       stop: Sequence[str], top_logprobs: int, prefix: str = "", media: dict | None = None,
                       on_token: Callable[[int, Token], None] | None = None) -> list[Choice]:
        """The n choices. With `on_token`, `on_token(choice_index, token)` is called for every sampled token as
        the sampler produces it (before the choices exist); the requests are validated before this coroutine
        first suspends, so a bad request fails its first step."""
        base = random.randrange(1 << 62) if seed is None else int(seed)
        requests = [Request(prompt_ids, max_tokens, temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, stop_ids=tuple(stop_ids),
                            seed=base + i, top_logprobs=top_logprobs, **(media or {})) for i in range(n)]
        try:
            if on_token is None:
                runs = [self.sampler.submit(r) for r in requests]
            else:
                streams = [self.sampler.stream(r) for r in requests]  # validates every request here
                runs = [_follow(i, s, on_token) for i, s in enumerate(streams)]
            completions = await asyncio.gather(*runs)
        except (ValueError, TypeError) as e:  # the sampler's own validation: bad ids, lengths, media
            raise BadRequest(str(e)) from e
        return [self._choice(c, prefix, stop) for c in completions]

    def _choice(self, c: Completion, prefix: str, stop: Sequence[str]) -> Choice:
        ids, lps, top, reason = list(c.token_ids), list(c.logprobs), list(c.top_logprobs), c.finish_reason
        text = prefix + self.chat.decode(ids)
        hits = [text.find(s, len(prefix)) for s in stop if s and text.find(s, len(prefix)) >= 0]
        if hits:
            cut = min(hits)
            text, reason = text[:cut], "stop"
            keep = next(k for k in range(len(ids) + 1) if len(prefix + self.chat.decode(ids[:k])) >= cut)
            ids, lps, top = ids[:keep], lps[:keep], top[:keep]
        return Choice(c, ids, lps, top, text, reason)

    def token_text(self, token_id: int) -> str:
        return self.chat.decode([token_id])


async def _follow(index: int, stream: AsyncIterator[Token | Completion],
                  on_token: Callable[[int, Token], None]) -> Completion:
    async for item in stream:
        if isinstance(item, Completion):
            return item
        on_token(index, item)
    raise RuntimeError("the sampler's stream ended without a completion")

