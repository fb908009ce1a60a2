"""Tokenizers behind one small protocol, so the pipeline never cares which one it has.

The default is a byte-level tokenizer that needs no download (ids 0..255 are raw UTF-8 bytes,
then a few specials). Real tokenizers load from local files only: sentencepiece ``.model``,
tiktoken BPE rank files (Kimi K2 ships one as ``tiktoken.model``) and HF ``tokenizer.json``.
``load_tokenizer`` picks one from a spec string.
"""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

# Specials shared by every tokenizer that has to add its own: the byte tokenizer gives them ids 256+i.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|media|>",  # placeholder the vision path replaces with patch embeddings
    "<|media_start|>",
    "<|media_end|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
)

# The Kimi chat format's special tokens (k25.data.chat) that SPECIAL_TOKENS lacks. `ByteTokenizer(chat=True)`
# appends them after SPECIAL_TOKENS, so every id the existing configs use keeps its value.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|media_begin|>",
    "<|media_content|>",
    "<think>",
    "</think>",
)

# tiktoken's cl100k split pattern; Kimi's own pattern can be passed to TiktokenTokenizer instead.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the eval loop need from any tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus ``SPECIAL_TOKENS`` at 256.. (vocab 264); lossless on any text.

    ``chat=True`` appends ``CHAT_SPECIAL_TOKENS`` (vocab 278) for the Kimi chat format.
    """

    def __init__(self, *, chat: bool = False) -> None:
        names = SPECIAL_TOKENS + (CHAT_SPECIAL_TOKENS if chat else ())
        self.special_ids: dict[str, int] = {t: 256 + i for i, t in enumerate(names)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_ids)

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|eos|>"]

    @property
    def media_id(self) -> int:
        return self.special_ids["<|media|>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Specials are dropped; a truncated multi-byte character decodes to U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file; a model without a pad piece pads with eos (padding is masked anyway)."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path} needs bos and eos pieces")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parses a tiktoken BPE file: one ``<base64 token> <rank>`` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_merge(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """tiktoken's merge rule in pure Python: repeatedly merge the lowest-ranked adjacent pair, leftmost first."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
        candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


class TiktokenTokenizer:
    """A tiktoken BPE rank file plus ``SPECIAL_TOKENS`` appended after the last rank (unless given).

    Uses the ``tiktoken`` package when installed and an equivalent pure-Python merge otherwise, so the
    file format works (slowly) without it. Special-token text in the input is encoded as ordinary text.
    """

    def __init__(
        self, path: str, *, pattern: str = CL100K_PATTERN, special_tokens: Mapping[str, int] | None = None
    ) -> None:
        self._ranks = read_tiktoken_ranks(path)
        n = max(self._ranks.values()) + 1
        self.special_ids = dict(special_tokens or {t: n + i for i, t in enumerate(SPECIAL_TOKENS)})
        self._special_set = frozenset(self.special_ids.values())
        self._vocab_size = max(n, max(self._special_set) + 1)
        self._pattern = pattern
        self._decoder = {v: k for k, v in self._ranks.items()}
        try:
            import tiktoken
        except ImportError:
            self._enc = None
        else:
            name = os.path.basename(str(path))
            self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self._ranks, special_tokens={})

    @functools.cached_property
    def _regex(self):
        import regex

        return regex.compile(self._pattern)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _special(self, *names: str) -> int:
        for name in names:
            if name in self.special_ids:
                return self.special_ids[name]
        raise KeyError(f"none of {names} among special tokens {sorted(self.special_ids)}")

    @property
    def pad_id(self) -> int:
        return self._special("<|pad|>", "[PAD]", "<|endoftext|>")

    @property
    def bos_id(self) -> int:
        return self._special("<|bos|>", "[BOS]", "<|begin_of_text|>")

    @property
    def eos_id(self) -> int:
        return self._special("<|eos|>", "[EOS]", "<|endoftext|>", "<|end_of_text|>")

    def encode(self, text: str) -> list[int]:
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        return [t for piece in self._regex.findall(text) for t in _bpe_merge(piece.encode("utf-8"), self._ranks)]

    def decode(self, ids: Sequence[int]) -> str:
        data = b"".join(self._decoder[int(i)] for i in ids if int(i) in self._decoder)
        return data.decode("utf-8", errors="replace")


# Candidate spellings of each special in common tokenizer.json files, first match wins.
_HF_SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("<|bos|>", "<s>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("<|eos|>", "</s>", "[EOS]", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}


class HFTokenizer:
    """An HF ``tokenizers`` ``tokenizer.json``; missing bos/eos/pad are added as ``SPECIAL_TOKENS``."""

    def __init__(self, path: str) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HFTok

        self._tok = _HFTok.from_file(str(path))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        ids = {}
        for key, names in _HF_SPECIAL_NAMES.items():
            found = next((n for n in names if n in vocab), None)
            if found is None:
                found = names[0]
                self._tok.add_special_tokens([AddedToken(found, special=True)])
            ids[key] = self._tok.token_to_id(found)
        self._bos, self._eos, self._pad = ids["bos"], ids["eos"], ids["pad"]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


_LOADERS = {"sp": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer, "hf": HFTokenizer}
_DIR_FILES = ("tokenizer.json", "tiktoken.model", "tokenizer.model")


def _sniff(path: str) -> str:
    """Tells the format of a tokenizer file from its name, then its first bytes."""
    if path.endswith(".json"):
        return "hf"
    if path.endswith(".tiktoken"):
        return "tiktoken"
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        return "hf"
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        try:
            base64.b64decode(first[0], validate=True)
            return "tiktoken"
        except ValueError:
            pass
    return "sp"  # sentencepiece models are binary protobufs


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``; ``"sp:PATH"``, ``"tiktoken:PATH"``, ``"hf:PATH"``; or a bare file/directory path, sniffed.

    A directory is searched for ``tokenizer.json``, ``tiktoken.model`` then ``tokenizer.model``.
    """
    if spec == "byte":
        return ByteTokenizer()
    kind, sep, rest = spec.partition(":")
    if sep and kind in _LOADERS:
        return _LOADERS[kind](rest)
    path = spec
    if os.path.isdir(path):
        for name in _DIR_FILES:
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no tokenizer file in {spec}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer spec {spec!r} is neither 'byte', 'kind:path' nor an existing path")
    return _LOADERS[_sniff(path)](path)
