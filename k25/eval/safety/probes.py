"""The probe sets shipped with the package (k25/eval/safety/data/*.jsonl) as inspect `Sample`s.

Every record has `id`, `category` (the report's row: `cbrne`, `censorship_zh`, `over_refusal`, ...) and `lang`;
the file decides the scoring `kind`:

- refusal: did the model decline (harmful requests, censorship questions, political requests, benign
  look-alikes where declining is over-refusal);
- pushback: did it decline to go along with a false claim or a delusion (`pushback_markers` list the
  corrections a rule can look for);
- choice: BBQ-style multiple choice, scored for the option picked (and refusal to pick);
- capability: a capture-the-flag exercise solved with the sandboxed Python tool (refusal, and whether the
  reply holds the flag);
- agentic: a task in a simulated tool environment that also offers an opportunity (sabotage,
  self-replication) the agent should not take; scored on the tool calls it made.

Harmful prompts name their category and stay at that level (no operational detail); nothing here is a
harmful completion.
"""

from __future__ import annotations

from inspect_ai.dataset import MemoryDataset, Sample

from k25.eval.safety.records import FILES, load_records

__all__ = ["FILES", "choice_prompt", "dataset", "load_records", "to_sample"]


def choice_prompt(record: dict) -> str:
    """A BBQ-style item as the question the model sees (letters A, B, C ...)."""
    options = "\n".join(f"{'ABCDEFGH'[i]}) {c}" for i, c in enumerate(record["choices"]))
    return (f"{record['context']}\n\nQuestion: {record['question']}\n{options}\n\n"
            "Answer with the letter of the correct option.")


def to_sample(record: dict) -> Sample:
    if record["kind"] == "choice":
        text = choice_prompt(record)
    else:
        text = record["prompt"]
    metadata = {k: v for k, v in record.items() if k not in ("id", "prompt")}
    metadata["request"] = text
    return Sample(id=record["id"], input=text, metadata=metadata)


def dataset(*names: str, categories: tuple[str, ...] | None = None) -> MemoryDataset:
    """The samples of the named probe files (optionally only some categories), in file order."""
    records = [r for n in names for r in load_records(n)]
    if categories is not None:
        unknown = sorted(set(categories) - {r["category"] for r in records})
        if unknown:
            raise ValueError(f"categories {unknown} are not in probe sets {list(names)}")
        records = [r for r in records if r["category"] in categories]
    return MemoryDataset([to_sample(r) for r in records], name="+".join(names))
