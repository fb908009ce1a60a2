"""Tokenizers: byte-level round trips and each file loader on a tiny model built in the test."""

import base64

import pytest

from k25.data.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
)

TEXTS = ["hello world", "the thing in the ring", "Zorvia's capital is Melk", "a=3\nprint(a)", "héllo → 世界", ""]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "the thing in the ring is the king of the thing",
    "Q: What is the capital of Zorvia? A: Melk",
    "a=3 b=a+2 print(b) Output: 5",
] * 20


def _check(tok: Tokenizer, texts=TEXTS) -> None:
    assert isinstance(tok, Tokenizer)
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert all(0 <= i < tok.vocab_size for i in specials)
    assert len({tok.bos_id, tok.eos_id}) == 2
    for text in texts:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert not specials & set(ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials drop out


def test_byte_tokenizer():
    tok = ByteTokenizer()
    _check(tok)
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert tok.encode("A\n") == [65, 10]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.media_id) == (256, 257, 258, 259)
    assert tok.decode(tok.encode("世")[:2]) == "\ufffd"  # cut multi-byte char decodes, doesn't raise
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    hf.train_from_iterator(CORPUS, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    _check(tok)
    assert tok.bos_id == hf.token_to_id("<s>") and tok.eos_id == hf.token_to_id("</s>")
    assert tok.pad_id == tok.vocab_size - 1  # added, since the file has none
    assert len(tok.encode("the thing")) < len("the thing")  # merges learned
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)  # directory lookup
    assert isinstance(load_tokenizer(f"hf:{path}"), HFTokenizer)


def _write_tiktoken(path, merges):
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        ranks[m.encode()] = len(ranks)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return ranks


@pytest.mark.parametrize("force_python", [True, False])
def test_tiktoken_file(tmp_path, force_python):
    pytest.importorskip("regex")
    if not force_python:
        pytest.importorskip("tiktoken")
    path = tmp_path / "tiktoken.model"  # Kimi's name for its tiktoken file: format is sniffed, not taken from .model
    ranks = _write_tiktoken(path, ["th", "he", "the", " t", " the", "in", "ing", "ng"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, TiktokenTokenizer)
    if force_python:
        tok._enc = None
    _check(tok)
    assert tok.vocab_size == len(ranks) + len(SPECIAL_TOKENS)
    assert tok.encode("the") == [ranks[b"the"]]
    assert tok.encode(" the thing") == [ranks[b" the"], ranks[b" "], ranks[b"th"], ranks[b"ing"]]
    assert isinstance(load_tokenizer(f"tiktoken:{path}"), TiktokenTokenizer)


def test_tiktoken_matches_library(tmp_path):
    pytest.importorskip("tiktoken")
    path = tmp_path / "x.tiktoken"
    _write_tiktoken(path, ["th", "he", "the", " t", " the", "in", "ing", "ng", "ri", "ring"])
    fast, slow = TiktokenTokenizer(str(path)), TiktokenTokenizer(str(path))
    slow._enc = None
    for text in TEXTS + CORPUS[:4]:
        assert fast.encode(text) == slow.encode(text)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,  # byte_fallback alone takes 256 pieces
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    _check(tok, ["hello world", "the thing in the ring", "Q: What is the capital of Zorvia? A: Melk", "héllo 世界"])
    assert tok.pad_id == tok.eos_id  # the default trainer adds no pad piece


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path))
