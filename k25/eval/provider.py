"""The `k25` model API for inspect_ai: `inspect eval TASK --model k25/<run dir or HF dir>`.

Inspect talks to every model through a `ModelAPI`; this one talks to a `k25.infer.client.ChatClient`, the
project's one model interface, so a checkpoint served in-process by the sampler, any OpenAI-compatible endpoint
and a scripted policy in tests all go through the same conversion. Inspect's own OpenAI converters do the
message mapping in both directions (`messages_to_openai`, `model_output_from_openai`), so a task sees exactly
the `ChatMessage`s, tool calls and reasoning blocks it would see from `--model openai/NAME`.

Model args (`-M key=value`):
- `client`: a ready ChatClient (tests, or a caller that already holds a sampler); otherwise the model name is a
  checkpoint path and `k25.infer.client.SamplerClient` loads it;
- `prompt_format`: "chat" (the Kimi chat format) or "raw" (bos + the user text, images as media placeholders,
  no template: what the pre-training stages' held-out evals score); "auto" picks "raw" for a run whose stage
  never saw the chat format and "chat" otherwise;
- `max_slots`, `max_len`, `cache_dtype`, `thinking`: how the checkpoint is served (`K25ModelAPI.load_client`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    messages_to_openai,
    model_output_from_openai,
)
from inspect_ai.tool import ToolChoice, ToolFunction, ToolInfo

from k25.infer.client import ChatClient, ChatResult, ClientError, assistant_message

PROMPT_FORMATS = ("auto", "chat", "raw")
# stages that train on plain packed text; their checkpoints have never seen the chat template
RAW_STAGES = ("lm", "k25")


def openai_tools(tools: list[ToolInfo]) -> list[dict]:
    """Inspect tool declarations as OpenAI `tools` entries (what the chat format's tool_declare renders)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters.model_dump(exclude_none=True)}}
            for t in tools]


def select_tools(tools: list[ToolInfo], tool_choice: ToolChoice | None) -> list[ToolInfo]:
    """ChatClient has no tool_choice: "none" hides the tools, a named choice offers only that tool."""
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, ToolFunction):
        return [t for t in tools if t.name == tool_choice.name]
    return list(tools)


def completion_dict(result: ChatResult, model: str) -> dict[str, Any]:
    """A ChatResult as an OpenAI ChatCompletion payload (for inspect's own converter)."""
    msg = dict(result.message)
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("reasoning_content"):
        message["reasoning_content"] = msg["reasoning_content"]
    if msg.get("tool_calls"):
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": c["function"]["arguments"]}}
                                 for c in msg["tool_calls"]]
    finish = result.finish_reason if result.finish_reason in ("stop", "length", "tool_calls") else "stop"
    out: dict[str, Any] = {"id": f"k25-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                           "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    if result.prompt_ids is not None and result.token_ids is not None:
        n_in, n_out = len(result.prompt_ids), len(result.token_ids)
        out["usage"] = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    return out


def raw_prompt(messages: list[dict]) -> list[str | dict]:
    """What a base (non-chat) checkpoint continues: the user turns' text and images in order, adjacent text
    joined (image parts stay OpenAI `image_url` parts); nothing else allowed."""
    parts: list[str | dict] = []
    for m in messages:
        if m["role"] not in ("user", "system"):
            raise ValueError(f"prompt_format='raw' serves single-turn prompts; got a {m['role']!r} message. "
                             "Use -M prompt_format=chat for multi-turn or tool-using tasks.")
        content = m["content"]
        for p in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if p.get("type") == "text":
                if parts and isinstance(parts[-1], str):
                    parts[-1] += p["text"]
                else:
                    parts.append(p["text"])
            elif p.get("type") == "image_url":
                parts.append(p)
            else:
                raise ValueError(f"prompt_format='raw' takes text and images, not {p.get('type')!r} parts.")
    return parts


def resolve_format(prompt_format: str, stage: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"k25 model arg prompt_format={prompt_format!r}; choose one of {PROMPT_FORMATS}.")
    if prompt_format == "auto":
        return "raw" if stage in RAW_STAGES else "chat"
    return prompt_format


def run_stage(path: str) -> str:
    """The training stage of a k25 run directory (its config.json), "hf" for anything else."""
    cfg = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(cfg):
        with open(cfg) as f:
            return json.load(f).get("stage", "lm")
    return "hf"


class RawClient:
    """A base checkpoint (a pre-training stage never saw the chat format): continues bos + text (and images,
    as media placeholders) with the sampler, stopping at eos -- the prompt the stage trained on and its
    held-out evals (`TextLMStage.evaluate`, the joint stage's `HeldOutTasks`) score. It has no chat turns;
    `chat` says so."""

    def __init__(self, sampler: Any, tokenizer: Any, *, model: str, max_slots: int) -> None:
        self.sampler, self.tokenizer, self.model, self.max_slots = sampler, tokenizer, model, max_slots

    async def chat(self, messages, **kwargs) -> ChatResult:
        raise ClientError(f"{self.model} is a base checkpoint without a chat format; use prompt_format='raw' "
                          "with single-turn text tasks")

    def prompt(self, parts: str | list[str | dict]) -> tuple[list[int], dict[str, Any]]:
        """(prompt ids, the sampler's media arguments) of `raw_prompt` parts: bos, then per part its text's
        tokens or one placeholder per merged token of its image -- the layout of the joint stage's documents
        (`k25.train.joint.JointData.sample_document`: bos, placeholders, prompt)."""
        from k25.serve.engine import BadRequest, decode_data_uri, image_media

        tok = self.tokenizer
        parts = [parts] if isinstance(parts, str) else parts
        try:
            images = [decode_data_uri(p["image_url"]["url"], "image_url") for p in parts if not isinstance(p, str)]
        except BadRequest as e:
            raise ClientError(f"{self.model}: {e}") from e
        media: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            if not self.sampler.multimodal:
                raise ClientError(f"{self.model} is a text-only checkpoint and cannot take images")
            media, counts = image_media(images, self.sampler.cfg.vision_config)
        ids, image = [tok.bos_id], iter(counts)
        for p in parts:
            ids += tok.encode(p) if isinstance(p, str) else [self.sampler.cfg.image_token_id] * next(image)
        return ids, media

    async def complete(self, parts: str | list[str | dict], *, temperature: float, top_p: float, max_tokens: int,
                       seed: int | None, stop: list[str] | None) -> ChatResult:
        from k25.infer import Request

        tok = self.tokenizer
        ids, media = self.prompt(parts)
        room = self.sampler.max_len - len(ids)
        if room < 1:
            raise ClientError(f"{self.model}: the prompt has {len(ids)} tokens, past the context of "
                              f"{self.sampler.max_len}; raise -M max_len")
        c = await self.sampler.submit(Request(ids, min(max_tokens, room), temperature=temperature, top_p=top_p,
                                              stop_ids=(tok.eos_id,), seed=seed or 0, **media))
        text = tok.decode([t for t in c.token_ids if t != tok.eos_id])
        for s in stop or ():
            text = text.split(s, 1)[0] if s else text
        return ChatResult(assistant_message(text), c.finish_reason, prompt_ids=list(c.prompt_ids),
                          token_ids=list(c.token_ids), logprobs=list(c.logprobs))


class K25ModelAPI(ModelAPI):
    """inspect_ai ModelAPI over a ChatClient (the sampler for `k25/PATH`)."""

    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig | None = None, client: ChatClient | None = None,
                 prompt_format: str = "auto", **model_args: Any) -> None:
        super().__init__(model_name, base_url, api_key, [], config or GenerateConfig())
        resolve_format(prompt_format, "")  # validates
        if client is None:
            client = self.load_client(model_name, prompt_format=prompt_format, **model_args)
            prompt_format = resolve_format(prompt_format, run_stage(model_name))
        elif model_args:
            raise ValueError(f"k25 model args {sorted(model_args)} only apply when loading a checkpoint, "
                             "not with a ready `client`.")
        if not isinstance(client, ChatClient):
            raise TypeError(f"k25 model arg client={client!r} does not implement k25.infer.client.ChatClient.")
        self.client = client
        if prompt_format == "auto":
            prompt_format = "raw" if isinstance(client, RawClient) else "chat"
        if prompt_format == "raw" and not isinstance(client, RawClient):
            raise ValueError(f"prompt_format='raw' needs a base checkpoint served raw (RawClient); "
                             f"{type(client).__name__} only chats.")
        self.prompt_format = prompt_format

    @staticmethod
    def load_client(path: str, *, prompt_format: str = "auto", max_slots: int = 8, max_len: int = 2048,
                    cache_dtype: str = "float32", thinking: bool = True) -> ChatClient:
        """The checkpoint at `path` (a k25 run directory or an HF directory) behind the sampler: a SamplerClient
        (chat format) or, for prompt_format "raw" ("auto" on a pre-training run), a RawClient."""
        from k25.serve.load import load_sampler

        # the plain distribution, placeholders included: evaluations must equal the stages' own (argmax) metrics
        sampler, chat = load_sampler(path, max_slots=max_slots, max_len=max_len, cache_dtype=cache_dtype,
                                     suppress_placeholders=False)
        if resolve_format(prompt_format, run_stage(path)) == "raw":
            return RawClient(sampler, chat.tokenizer, model=path, max_slots=int(max_slots))
        from k25.infer.client import SamplerClient

        client = SamplerClient(sampler, chat, model=path, thinking=thinking)
        client.max_slots = int(max_slots)
        return client

    def max_connections(self) -> int:
        # the sampler batches concurrent requests itself; let inspect keep its slots busy
        return int(getattr(self.client, "max_slots", 32))

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice,
                       config: GenerateConfig) -> ModelOutput:
        messages = [dict(m) for m in await messages_to_openai(input)]
        kwargs: dict[str, Any] = dict(
            temperature=1.0 if config.temperature is None else config.temperature,
            top_p=1.0 if config.top_p is None else config.top_p,
            max_tokens=config.max_tokens or 512, seed=config.seed, stop=config.stop_seqs)
        if self.prompt_format == "raw":
            result = await self.client.complete(raw_prompt(messages), **kwargs)
        else:
            offered = select_tools(tools, tool_choice)
            if config.reasoning_effort == "none":
                kwargs["chat_template_kwargs"] = {"thinking": False}
            result = await self.client.chat(messages, tools=openai_tools(offered) or None, **kwargs)
        output = await model_output_from_openai(completion_dict(result, self.model_name))
        output.metadata = {"prompt_ids": result.prompt_ids, "token_ids": result.token_ids,
                           "logprobs": result.logprobs} if result.token_ids is not None else None
        return output

