"""The Llama 3 tokenizer against tiktoken built independently from the same ranks file."""

import importlib

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from prefixlm.vocab import tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "strawberry has three r's; personality isn't person + ality.",
    "naïve café résumé — “quotes” ‘single’ … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀👩‍👩‍👧 中文字符 日本語のテキスト 한국어",
    "Windows line endings\r\nsecond line\r\n\r\nthird\rcarriage only",
    "digits 1234567890 3.14159 1,000,000 2026-11-23 0x1F",
    "tabs\tand    four spaces" + " " * 300 + "end" + "\n" * 50,
    "   leading and trailing   ",
    "text that spells <|end_of_text|> and <|begin_of_text|> stays plain text",
    "I'M SHOUTING and we'll see what's 'quoted'",
    "",
    "\u0000\u0001 control chars and \ufeff BOM",
]


@pytest.fixture(scope="module")
def reference():
    """tiktoken configured from Meta's own tokenizer module: pattern and ranks, no prefixlm code."""
    meta = importlib.import_module("llama_models.llama3.tokenizer")
    path = tokenizer.llama3_ranks_path()
    ranks = load_tiktoken_bpe(str(path))
    specials = {s: len(ranks) + i for i, s in enumerate(tokenizer.llama3_special_tokens())}
    return tiktoken.Encoding("ref", pat_str=meta.Tokenizer.pat_str, mergeable_ranks=ranks,
                             special_tokens=specials), meta


def test_pattern_and_specials_match_meta(reference):
    _, meta = reference
    assert tokenizer.LLAMA3_PATTERN == meta.Tokenizer.pat_str
    t = meta.Tokenizer(tokenizer.llama3_ranks_path())
    ours = tokenizer.load("llama3")
    assert ours.special_ids == t.special_tokens
    assert (ours.bos_id, ours.eos_id) == (t.bos_id, t.eos_id) == (128000, 128001)


def test_vocab_size_and_token_bytes(llama3):
    assert llama3.vocab_size == 128256
    assert all(b is None for b in llama3.token_bytes[128000:])
    assert all(isinstance(b, bytes) and b for b in llama3.token_bytes[:128000])
    assert len(set(llama3.token_bytes[:128000])) == 128000


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_tiktoken(llama3, reference, text):
    enc, _ = reference
    ids = llama3.encode(text)
    assert ids == enc.encode(text, disallowed_special=())
    assert llama3.decode(ids) == text
    assert llama3.decode_bytes(ids) == text.encode("utf-8")
    assert 128001 not in ids and 128000 not in ids


def test_encode_batch_and_long_document(llama3, reference):
    enc, _ = reference
    long_doc = " ".join(TEXTS) * 200
    assert llama3.encode_batch(TEXTS + [long_doc]) == [
        enc.encode(t, disallowed_special=()) for t in TEXTS + [long_doc]
    ]


def test_token_bytes_are_the_encoding_pieces(llama3):
    ids = llama3.encode(" personality strawberry")
    assert [llama3.token_bytes[i] for i in ids] == [
        llama3.encoding.decode_single_token_bytes(i) for i in ids
    ]


def test_missing_ranks_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not base64 ranks\n")
    with pytest.raises(ValueError, match="is not a tiktoken ranks file"):
        tokenizer.TiktokenTokenizer(bad)


def test_hf_tokenizer_from_local_dir_matches(tmp_path, llama3):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(vocab_file=str(tokenizer.llama3_ranks_path()),
                             pattern=tokenizer.LLAMA3_PATTERN,
                             extra_special_tokens=tokenizer.llama3_special_tokens())
    fast = PreTrainedTokenizerFast(tokenizer_object=conv.converted(),
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(tmp_path)
    hf = tokenizer.load(str(tmp_path))
    assert hf.vocab_size == 128256
    assert hf.token_bytes == llama3.token_bytes
    assert hf.eos_id == 128001
    for text in TEXTS[:6]:
        assert hf.encode(text) == llama3.encode(text)


def test_unreachable_hub_id_says_what_to_do():
    with pytest.raises(OSError, match="Offline"):
        tokenizer.load("no-such-org/no-such-tokenizer-prefixlm")
