"""Toolset dispatch: every mistake the model can make comes back as ToolResult.error, never an exception."""

import asyncio
import json

import pytest

from k25.tools import Tool, ToolResult, Toolset


class Crop(Tool):
    name = "crop"
    description = "Crop a box."
    parameters = {
        "type": "object",
        "properties": {"box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
                       "label": {"type": "string"}},
        "required": ["box"],
        "additionalProperties": False,
    }

    def __init__(self):
        self.seen = []

    async def call(self, arguments):
        self.seen.append(arguments)
        return ToolResult(text=f"cropped {arguments['box']}")


class Broken(Tool):
    name = "broken"
    description = "Always raises."
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments):
        raise RuntimeError("disk on fire")


def run(coro):
    return asyncio.run(coro)


def test_schema_is_an_openai_function_declaration():
    tools = Toolset([Crop()])
    assert tools.schemas() == [{"type": "function", "function": {
        "name": "crop", "description": "Crop a box.", "parameters": Crop.parameters}}]
    assert "crop" in tools and tools.names == ["crop"] and len(tools) == 1


def test_valid_call_with_json_string_and_dict():
    crop = Crop()
    tools = Toolset([crop])
    r1 = run(tools.call("crop", json.dumps({"box": [0, 0, 4, 4]})))
    r2 = run(tools.call("crop", {"box": [1, 2, 3, 4], "label": "x"}))
    r3 = run(tools.dispatch({"id": "c1", "type": "function",
                             "function": {"name": "crop", "arguments": '{"box": [5, 6, 7, 8]}'}}))
    assert [r.error for r in (r1, r2, r3)] == [None, None, None]
    assert r1.text == "cropped [0, 0, 4, 4]"
    assert crop.seen == [{"box": [0, 0, 4, 4]}, {"box": [1, 2, 3, 4], "label": "x"}, {"box": [5, 6, 7, 8]}]


@pytest.mark.parametrize("name, arguments, expected", [
    ("zoom", "{}", "unknown tool 'zoom'; available tools: 'crop', 'broken'"),
    ("crop", '{"box": [1, 2', "are not valid JSON"),
    ("crop", "[1, 2, 3, 4]", "must be a JSON object, got list"),
    ("crop", '{"label": "a"}', "(arguments): 'box' is a required property"),
    ("crop", '{"box": [1, 2, 3]}', "box: [1, 2, 3] is too short"),
    ("crop", '{"box": [1, 2, 3, "4"]}', "box/3: '4' is not of type 'integer'"),
    ("crop", '{"box": [1, 2, 3, 4], "zoom": 2}', "Additional properties are not allowed ('zoom' was unexpected)"),
    ("broken", "{}", "tool 'broken' failed: RuntimeError: disk on fire"),
])
def test_model_mistakes_become_errors(name, arguments, expected):
    crop = Crop()
    tools = Toolset([crop, Broken()])
    result = run(tools.call(name, arguments))
    assert result.error is not None and expected in result.error, result.error
    assert crop.seen == []


def test_malformed_tool_call_and_empty_arguments():
    tools = Toolset([Broken(), Crop()])
    assert "malformed tool call" in run(tools.dispatch({"function": "crop"})).error
    assert "'box' is a required property" in run(tools.call("crop", "")).error
    assert "disk on fire" in run(tools.call("broken", None)).error


def test_bad_tool_definitions_are_refused_at_registration():
    class BadSchema(Crop):
        name = "bad"
        parameters = {"type": "object", "properties": {"x": {"type": "nonsense"}}}

    class NotObject(Crop):
        name = "scalar"
        parameters = {"type": "string"}

    with pytest.raises(ValueError, match="not a valid JSON schema"):
        Toolset([BadSchema()])
    with pytest.raises(ValueError, match="must describe an object"):
        Toolset([NotObject()])
    with pytest.raises(ValueError, match="already in this toolset"):
        Toolset([Crop(), Crop()])


def test_tool_result_content():
    assert ToolResult(text="a").content() == "a" and ToolResult(text="a").ok
    assert ToolResult(text="a", error="E").content() == "a\nE"
    assert ToolResult(error="E").content() == "E" and not ToolResult(error="E").ok
