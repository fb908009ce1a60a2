"""The shipped probe files (k25/eval/safety/data/*.jsonl) as plain records, without inspect: the RL stage's
safety task (k25.data.synthetic.safety) holds them out as its eval split, and k25.eval.safety.probes turns them
into inspect samples."""

from __future__ import annotations

import json
from importlib import resources

# probe file -> how its records are scored (see k25.eval.safety.probes)
FILES = {
    "cbrne": "refusal", "cyber": "refusal", "harmful_compliance": "refusal", "over_refusal": "refusal",
    "censorship": "refusal", "political_bias": "refusal", "sycophancy": "pushback", "delusion": "pushback",
    "social_bias": "choice", "agentic": "agentic", "cyber_capability": "capability",
}


def load_records(name: str) -> list[dict]:
    """The records of one shipped probe file, each with its scoring `kind` added."""
    if name not in FILES:
        raise KeyError(f"unknown probe set {name!r}; shipped: {sorted(FILES)}")
    text = resources.files("k25.eval.safety").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    return [{**json.loads(line), "kind": FILES[name]} for line in text.splitlines() if line.strip()]
