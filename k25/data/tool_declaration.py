"""Kimi K2.5's TypeScript-style tool declaration (the `tools_ts_str` its tokenizer hands the chat template).

K2.5's released tokenizer (`tokenization_kimi.py`) deep-sorts the tools and turns OpenAI function schemas into
a `namespace functions { type NAME = (_: {...}) => any; }` block with JSON-Schema descriptions and constraints
as `//` comments; the chat template writes that block into the `tool_declare` system turn and falls back to
compact JSON when the encoder fails. No library writes this format, so it is written here; the rules follow
the released encoder's output (golden cases in tests/data/fixtures/kimi_k25_tools.json).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

_INDENT = "  "
_FIELD_SEP = ",\n"
# JSON-Schema keys shown as a `// key: value` comment above a field, per type.
_CONSTRAINT_KEYS = {"string": ("maxLength", "minLength", "pattern"), "number": ("maximum", "minimum"),
                    "integer": ("maximum", "minimum"), "array": ("maxItems", "minItems")}


def deep_sort(obj: Any) -> Any:
    """Dict keys sorted at every depth (lists keep their order), as the released tokenizer does to `tools`."""
    if isinstance(obj, dict):
        return {k: deep_sort(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [deep_sort(v) for v in obj]
    return obj


def _comment(text: str, indent: str) -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _inline(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _Registry:
    """`$defs` seen while parsing one function's parameters, and whether the schema refers to itself (`#`)."""

    def __init__(self) -> None:
        self.definitions: dict[str, Any] = {}
        self.self_ref = False


class _Type:
    """One parsed schema node: its TypeScript text is built by `ts(indent)`; `doc(indent)` the comment lines."""

    def __init__(self, schema: Any, registry: _Registry):
        self.schema = schema if isinstance(schema, dict) else {}
        self.registry = registry
        self.kind, self.children, self.name = "scalar", [], "any"
        s = self.schema
        if isinstance(schema, bool):
            self.name = "any" if schema else "null"
        elif not isinstance(schema, dict) or not schema:
            self.name = "any"
        elif "$ref" in s:
            ref = str(s["$ref"])
            if ref == "#":
                registry.self_ref, self.name = True, "parameters"
            else:
                self.name = ref.rsplit("/", 1)[-1] if ref.startswith("#/$defs/") else "any"
        elif "anyOf" in s or "oneOf" in s:
            self.kind = "union"
            self.children = [_Type(x, registry) for x in s.get("anyOf", s.get("oneOf")) or []]
        elif "allOf" in s:
            self.kind = "intersection"
            self.children = [_Type(x, registry) for x in s["allOf"] or []]
        elif "enum" in s:
            self.kind = "literal"
        elif isinstance(s.get("type"), list):
            self.kind = "union"
            self.children = [_Type({"type": t}, registry) for t in s["type"]]
        elif s.get("type") == "object" or ("type" not in s and "properties" in s):
            self.kind = "object"
            if isinstance(s.get("$defs"), dict):
                registry.definitions.update(s["$defs"])
            required = set(s.get("required") or ())
            props = s.get("properties") or {}
            self.fields = [(name, name not in required, _Type(p, registry), p.get("default")
                            if isinstance(p, dict) else None, isinstance(p, dict) and "default" in p)
                           for name, p in props.items()]
            extra = s.get("additionalProperties")
            self.extra = None if extra is None else ("any" if extra is True else "never" if extra is False
                                                     else _Type(extra, registry))
        elif s.get("type") == "array":
            self.kind = "array"
            items = s.get("items")
            self.children = [_Type(items if items is not None else {}, registry)]
        else:
            t = s.get("type", "any")
            self.name = "number" if t == "integer" else str(t)

    def doc(self, indent: str) -> str:
        out = ""
        desc = self.schema.get("description")
        if isinstance(desc, str) and desc:
            out += _comment(desc, indent) + "\n"
        keys = _CONSTRAINT_KEYS.get(self.schema.get("type") if isinstance(self.schema.get("type"), str) else "", ())
        found = sorted(k for k in keys if k in self.schema)
        if found:
            out += f"{indent}// " + ", ".join(f"{k}: {_inline(self.schema[k])}" for k in found) + "\n"
        return out

    def ts(self, indent: str) -> str:
        if self.kind == "union":
            return " | ".join(c.ts(indent) for c in self.children) or "any"
        if self.kind == "intersection":
            return " & ".join(c.ts(indent) for c in self.children) or "any"
        if self.kind == "literal":
            return " | ".join(json.dumps(v, ensure_ascii=False) for v in self.schema["enum"]) or "never"
        if self.kind == "array":
            inner = indent + _INDENT
            item = self.children[0]
            doc = item.doc(inner)
            return f"Array<{item.ts(indent)}>" if not doc else f"Array<\n{doc}{inner}{item.ts(indent)}\n{indent}>"
        if self.kind == "object":
            return self._object_ts(indent)
        return self.name

    def _object_ts(self, indent: str) -> str:
        inner = indent + _INDENT
        ordered = sorted((f for f in self.fields if not f[1]), key=lambda f: f[0]) + \
            sorted((f for f in self.fields if f[1]), key=lambda f: f[0])
        parts = []
        for name, optional, typ, default, has_default in ordered:
            text = typ.doc(inner)
            if has_default:
                text += f"{inner}// Default: {json.dumps(default, ensure_ascii=False)}\n"
            parts.append(f"{text}{inner}{name}{'?' if optional else ''}: {typ.ts(inner)}")
        if self.extra is not None:
            value = self.extra if isinstance(self.extra, str) else self.extra.ts(inner)
            parts.append(f"{inner}[k: string]: {value}")
        return "{\n" + _FIELD_SEP.join(parts) + f"\n{indent}}}" if parts else "{}"


def _function_ts(function: dict) -> str:
    registry = _Registry()
    params = function.get("parameters") or {}
    root = _Type({**params, "type": "object"} if isinstance(params, dict) else {}, registry)
    interfaces = []
    if registry.self_ref:
        interfaces.append(f"interface parameters {root.ts('')}")
    seen: set[str] = set()
    while len(seen) < len(registry.definitions):  # a definition may register more while being parsed
        name = next(n for n in registry.definitions if n not in seen)
        seen.add(name)
        schema = registry.definitions[name]
        head = _comment(schema["description"], "") + "\n" if isinstance(schema, dict) and schema.get(
            "description") else ""
        interfaces.append(f"{head}interface {name} {_Type(schema, registry).ts('')}")
    arg = "parameters" if registry.self_ref else root.ts("")
    desc = function.get("description") or ""
    parts = ["\n".join(interfaces), _comment(desc, "") if desc else "",
             f"type {function.get('name', 'function')} = (_: {arg}) => any;"]
    return "\n".join(p for p in parts if p)


def encode_tools_typescript(tools: Sequence[dict] | None) -> str | None:
    """The `# Tools` TypeScript block for OpenAI-style `tools`, or None when there is no function tool."""
    funcs = [_function_ts(t["function"]) for t in tools or () if isinstance(t, dict) and t.get("type") == "function"
             and isinstance(t.get("function"), dict)]
    if not funcs:
        return None
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(funcs) + "\n}\n"
