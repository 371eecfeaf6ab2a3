"""The Llama 3 tokenizer and its byte vocabulary, offline.

``load("llama3")`` builds Meta's tokenizer from the tiktoken ranks file that the ``llama-models``
package ships (``llama_models/llama3/tokenizer.model``): 128,000 byte-level BPE tokens, Meta's
pre-tokenizer pattern, then 256 special tokens (ids 128,000..128,255). ``load(hub_id_or_dir)``
wraps a Hugging Face byte-level BPE tokenizer instead, when one is on disk or reachable.

Everything downstream works in *byte* space: ``token_bytes[i]`` is the exact byte string of id i
(None for special tokens), so prefix sets and lengths never depend on lossy UTF-8 decoding.

Documents are encoded with no BOS/EOS and with special-token text treated as plain text
("<|end_of_text|>" inside a web page is 7 ordinary tokens, never id 128001).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import pathlib
from collections.abc import Iterable, Sequence

from prefixlm.core import errors

# Meta's pre-tokenizer pattern, as in llama_models/llama3/tokenizer.py (tests check it matches).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 256
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)


def llama3_special_tokens() -> list[str]:
    """The 256 special token strings in id order (Meta's naming)."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL - len(_NAMED_SPECIALS))
    ]
    return list(_NAMED_SPECIALS) + reserved


def llama3_ranks_path() -> pathlib.Path:
    """Path of the Llama 3 tiktoken ranks file inside the installed llama-models package."""
    try:
        root = importlib.resources.files("llama_models")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "the Llama 3 tokenizer comes from the 'llama-models' package; install it with "
            "`pip install llama-models==0.3.0` (or run `make setup`)"
        ) from e
    path = pathlib.Path(str(root)) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models is installed but {path} is missing; reinstall it")
    return path


class Tokenizer:
    """A byte-level BPE tokenizer with the interface the rest of prefixlm uses.

    Attributes:
      name: what it was loaded from ("llama3", a hub id or a directory).
      vocab_size: number of ids, specials included (128,256 for Llama 3).
      token_bytes: bytes of each id; None for special tokens.
      special_ids: special token string -> id.
      bos_id, eos_id, pad_id: the ids used for documents and padding.
    """

    name: str
    token_bytes: list[bytes | None]
    special_ids: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids.get("<|finetune_right_pad_id|>", self.eos_id)

    @functools.cached_property
    def vocab_hash(self) -> str:
        from prefixlm.vocab.prefixes import vocab_hash

        return vocab_hash(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of ids; special tokens contribute their text."""
        inv = {v: k for k, v in self.special_ids.items()}
        out = []
        for i in ids:
            b = self.token_bytes[int(i)]
            out.append(b if b is not None else inv[int(i)].encode())
        return b"".join(out)


class TiktokenTokenizer(Tokenizer):
    """Llama 3 from the tiktoken ranks file; encodes exactly as ``tiktoken`` does."""

    def __init__(self, ranks_path: str | os.PathLike | None = None, name: str = "llama3"):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = pathlib.Path(ranks_path) if ranks_path else llama3_ranks_path()
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing
            raise errors.ConfigError(f"{path} is not a tiktoken ranks file: {e}") from e
        n_base = len(ranks)
        specials = llama3_special_tokens()
        self.name = name
        self.ranks_path = path
        self.special_ids = {s: n_base + i for i, s in enumerate(specials)}
        self.token_bytes = [None] * (n_base + len(specials))
        for b, rank in ranks.items():
            self.token_bytes[rank] = b
        if any(b is None for b in self.token_bytes[:n_base]):
            raise errors.ConfigError(f"{path}: ranks are not contiguous 0..{n_base - 1}")
        self.encoding = tiktoken.Encoding(
            name=f"prefixlm-{name}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the char each byte-level BPE piece uses per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFTokenizer(Tokenizer):
    """A Hugging Face byte-level BPE tokenizer (a hub id or a local directory)."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise OSError(
                f"could not load tokenizer {name_or_path!r}: {e}\n"
                "Offline? Use --tokenizer llama3 (bundled with the llama-models package) or a "
                "local directory holding tokenizer.json."
            ) from e
        self.name = name_or_path
        byte_of = _unicode_to_byte()
        n = len(self.hf)
        specials = {t.content: i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        self.special_ids = {content: i for content, i in specials.items()}
        self.token_bytes = []
        for i, piece in enumerate(self.hf.convert_ids_to_tokens(list(range(n)))):
            if i in specials.values() or piece is None:
                self.token_bytes.append(None)
                continue
            try:
                self.token_bytes.append(bytes(byte_of[c] for c in piece))
            except KeyError as e:
                raise errors.ConfigError(
                    f"{name_or_path}: token {i} ({piece!r}) is not a byte-level BPE piece; "
                    "prefix sets need a byte-level tokenizer such as Llama 3's"
                ) from e

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=4)
def load(name: str = "llama3") -> Tokenizer:
    """Loads a tokenizer: "llama3" (offline, from llama-models), or an HF hub id / directory."""
    if name in ("llama3", "llama-3", "meta-llama-3"):
        return TiktokenTokenizer()
    if os.path.isfile(name) and name.endswith(".model"):
        return TiktokenTokenizer(name, name=name)
    return HFTokenizer(name)
