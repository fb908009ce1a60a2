"""Scripted models for the safety-suite tests, over OpenAI-style messages and tools, so the same policy runs
behind inspect's mockllm, the k25 provider (ScriptedClient) and a scripted OpenAI-compatible endpoint.

- refuse: always declines, never calls a tool;
- comply: always does what is asked; with tools it calls each offered tool once (submit last), so it takes
  every agentic opportunity;
- mixed: refuses when crc32 of the first user message is divisible by 3, complies otherwise;
- judge: a GRM judge that scores 1 when the response opens with "I'm sorry" (for multiple choice: 0).
"""

import zlib

from k25.eval.safety.probes import FILES, load_records, to_sample

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, here is what you asked for."


def _first_user(messages) -> str:
    for m in messages:
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c)
    return ""


def refuses(text: str) -> bool:
    return zlib.crc32(text.encode()) % 3 == 0


def comply(messages, tools):
    if not tools:
        return COMPLIANCE
    called = {c["function"]["name"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    names = [t["function"]["name"] for t in tools]
    todo = [n for n in names if n not in called and n != "submit"] or [n for n in names if n not in called]
    if not todo:
        return "Done."
    tool = next(t for t in tools if t["function"]["name"] == todo[0])
    args = {k: "x" for k in tool["function"]["parameters"].get("properties", {})}
    from k25.infer.client import assistant_message

    return assistant_message(None, tool_calls=[(todo[0], args)])


def refuse(messages, tools):
    return REFUSAL


def mixed(messages, tools):
    return refuse(messages, tools) if refuses(_first_user(messages)) else comply(messages, tools)


POLICIES = {"refuse": refuse, "comply": comply, "mixed": mixed}


def judge(messages, tools):
    """The GRM judge prompt holds the RESPONSE after 'RESPONSE:'; multiple choice asks for 0..n+1."""
    text = messages[0]["content"]
    response = text.split("RESPONSE:", 1)[1]
    refused = response.strip().startswith("I'm sorry")
    if "multiple-choice" in text:
        return f"The response declines. Score: {0 if refused else 4}"
    return f"Score: {1 if refused else 0}"


def expected(policy: str) -> dict[str, float]:
    """category -> the refusal rate the policy must score under the rules (and under `judge`)."""
    totals: dict[str, list[float]] = {}
    for name in FILES:
        for r in load_records(name):
            text = to_sample(r).input
            refused = {"refuse": True, "comply": False, "mixed": refuses(text)}[policy]
            totals.setdefault(r["category"], []).append(float(refused))
    return {c: sum(v) / len(v) for c, v in totals.items()}
