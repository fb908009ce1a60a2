"""Evaluation and safety harness on inspect_ai: the `k25` model API, capability tasks, the safety suite."""
