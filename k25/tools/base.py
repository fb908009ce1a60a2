"""The tool interface shared by SFT data generation, the RL environment and the swarm.

A `Tool` declares itself the way the chat format needs it (an OpenAI function declaration) and runs one call
asynchronously, returning a `ToolResult`. A `Toolset` dispatches the model's tool calls by name. Whatever the
model writes (an unknown name, arguments that are not JSON, arguments that break the schema) comes back as
`ToolResult.error` so the episode continues and the model sees what it did wrong; nothing is raised into it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ToolResult:
    """What a tool returns to the model.

    text: what the model reads (stdout, the shown value, notes such as truncation).
    images: new image inputs for the model, as `PIL.Image.Image` objects (mode "L", "RGB" or "RGBA").
    error: None on success, else a message for the model (it may accompany partial `text`).
    """

    text: str = ""
    images: list = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def content(self) -> str:
        """Text and error together, as one tool message's text."""
        if self.error is None:
            return self.text
        return f"{self.text}\n{self.error}" if self.text else self.error


class Tool(abc.ABC):
    """One callable tool. Subclasses set `name`, `description` and `parameters` (a JSON schema for the
    arguments object) and implement `call`, which receives arguments already validated against it."""

    name: str
    description: str
    parameters: dict[str, Any]

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function declaration that the chat format declares."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    @abc.abstractmethod
    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        """Run once on validated arguments. Failures the model caused are returned as `ToolResult.error`."""

    def close(self) -> None:  # noqa: B027 - optional for tools that hold nothing
        """Release what the tool holds (processes, files). Default: nothing."""


class Toolset:
    """Tools by name, with validation and dispatch of parsed tool calls."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        name = getattr(tool, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(tool).__name__}.name must be a non-empty string, got {name!r}")
        if name in self._tools:
            raise ValueError(f"a tool named {name!r} is already in this toolset; tool names must be unique")
        cls = jsonschema.validators.validator_for(tool.parameters)
        try:
            cls.check_schema(tool.parameters)
        except jsonschema.SchemaError as e:
            raise ValueError(f"{type(tool).__name__}.parameters is not a valid JSON schema: {e.message}") from None
        if tool.parameters.get("type") != "object":
            raise ValueError(f"{type(tool).__name__}.parameters must describe an object (type: object), "
                             f"got type {tool.parameters.get('type')!r}")
        self._tools[name] = tool
        self._validators[name] = cls(tool.parameters)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools` list for the chat format / an OpenAI request."""
        return [tool.schema for tool in self._tools.values()]

    def parse_arguments(self, name: str, arguments: str | Mapping[str, Any] | None) -> dict[str, Any] | ToolResult:
        """Arguments as a validated dict, or a ToolResult carrying the error the model should see."""
        if name not in self._tools:
            known = ", ".join(repr(n) for n in self._tools) or "none"
            return ToolResult(error=f"unknown tool {name!r}; available tools: {known}")
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, (str, bytes)):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return ToolResult(error=f"arguments for tool {name!r} are not valid JSON ({e.msg} at line {e.lineno} "
                                        f"column {e.colno}); send a JSON object")
        if not isinstance(arguments, Mapping):
            return ToolResult(error=f"arguments for tool {name!r} must be a JSON object, "
                                    f"got {type(arguments).__name__}")
        arguments = dict(arguments)
        errors = sorted(self._validators[name].iter_errors(arguments), key=lambda e: list(e.absolute_path))
        if errors:
            msgs = []
            for err in errors[:5]:
                where = "/".join(str(p) for p in err.absolute_path) or "(arguments)"
                msgs.append(f"{where}: {err.message}")
            return ToolResult(error=f"arguments for tool {name!r} do not match its schema: " + "; ".join(msgs))
        return arguments

    async def call(self, name: str, arguments: str | Mapping[str, Any] | None) -> ToolResult:
        """Run one tool call (name + JSON-string or dict arguments). Never raises for anything the model did;
        an unexpected exception inside a tool is logged and returned as an error too."""
        parsed = self.parse_arguments(name, arguments)
        if isinstance(parsed, ToolResult):
            return parsed
        try:
            result = await self._tools[name].call(parsed)
        except Exception as e:  # noqa: BLE001 - a broken tool must not end the episode; logged with traceback
            log.exception("tool %r raised", name)
            return ToolResult(error=f"tool {name!r} failed: {type(e).__name__}: {e}")
        if not isinstance(result, ToolResult):
            return ToolResult(error=f"tool {name!r} returned {type(result).__name__}, not a ToolResult")
        return result

    async def dispatch(self, tool_call: Mapping[str, Any]) -> ToolResult:
        """Run an OpenAI-style tool call: {"type": "function", "function": {"name", "arguments"}} (the shape
        `k25.infer.client.ChatResult.tool_calls` holds)."""
        fn = tool_call.get("function") if isinstance(tool_call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            return ToolResult(error="malformed tool call: expected {'function': {'name': str, 'arguments': str}}")
        return await self.call(fn["name"], fn.get("arguments"))

    def close(self) -> None:
        for tool in self._tools.values():
            tool.close()

    def __enter__(self) -> Toolset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
