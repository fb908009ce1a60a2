"""Deterministic, resumable grain input pipelines: tokenizers, sources, synthetic tasks, mixing, packing."""

from k25.data.pipeline import default_data_config, make_eval_examples, make_train_iterator
from k25.data.synthetic import TASKS, exact_match, make_task
from k25.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "Tokenizer",
    "default_data_config",
    "exact_match",
    "load_tokenizer",
    "make_eval_examples",
    "make_task",
    "make_train_iterator",
]
