"""Tokenizers an index can be built with: bytes, a word vocabulary, a transformers tokenizer or a callable.

Every adapter has the same small face (`encode`, `decode`, `pieces`, `max_id`, `fingerprint`), so the index
never needs to know which kind it holds. The fingerprint goes into the index manifest; tracing with a
tokenizer whose fingerprint differs is refused.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CorpusError

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=12).hexdigest()


class Tokenizer:
    """The face every tokenizer adapter shows to the index."""

    name: str = "tokenizer"
    #: the largest id `encode` can return (decides the index's token width)
    max_id: int = 2**32 - 2
    #: an id that stands for "unknown"; it never matches anything in the corpus
    unk_id: int | None = None

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces(ids))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """One display string per token; joined they give the decoded text."""
        return [self.decode([int(i)]) for i in ids]

    def to_config(self) -> dict[str, Any] | None:
        """A JSON description to store beside an index, or None if it cannot be stored."""
        return None


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: needs no vocabulary and no download."""

    name = "bytes"
    # UTF-8 never contains the bytes 0xF5..0xFF, so 0xFF stays free for the document separator.
    max_id = 0xF4

    @property
    def fingerprint(self) -> str:
        return "bytes-utf8"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def pieces(self, ids: Sequence[int]) -> list[str]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [dec.decode(bytes([int(i)])) for i in ids]

    def to_config(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class WordTokenizer(Tokenizer):
    """Words and punctuation marks from a fixed vocabulary; id 0 is `<unk>`.

    Built from a corpus with `WordTokenizer.fit(texts)`; small, deterministic and offline, which is what
    tests, demos and tiny language models need.
    """

    name = "word"
    unk_id = 0

    def __init__(self, vocab: Sequence[str], lowercase: bool = False):
        vocab = list(vocab)
        if not vocab or vocab[0] != "<unk>":
            vocab = ["<unk>"] + [w for w in vocab if w != "<unk>"]
        self.vocab = vocab
        self.lowercase = lowercase
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_id = len(vocab) - 1
        self._fp = _digest({"kind": "word", "vocab": vocab, "lowercase": lowercase})

    @classmethod
    def fit(cls, texts: Iterable[str], lowercase: bool = False, min_count: int = 1) -> WordTokenizer:
        """Make a vocabulary of every word and punctuation mark in `texts` (most frequent first)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_WORD_RE.findall(text.lower() if lowercase else text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(["<unk>", *words], lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def fingerprint(self) -> str:
        return self._fp

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return [self.index.get(w, 0) for w in _WORD_RE.findall(text)]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        out = []
        for k, i in enumerate(ids):
            w = self.vocab[int(i)] if 0 <= int(i) < len(self.vocab) else "<unk>"
            glue = k > 0 and (w[:1].isalnum() or w[:1] == "_" or w == "<unk>")
            out.append((" " if glue else "") + w)
        return out

    def to_config(self) -> dict[str, Any]:
        return {"kind": "word", "vocab": self.vocab, "lowercase": self.lowercase}


class HFTokenizer(Tokenizer):
    """A transformers tokenizer, used as it is (no special tokens added)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.name = type(tok).__name__
        vocab = tok.get_vocab()
        self.max_id = max(vocab.values()) if vocab else 0
        self.unk_id = None
        self._fp = _digest({"kind": "hf", "class": self.name, "vocab": sorted(vocab.items())})

    @property
    def fingerprint(self) -> str:
        return self._fp

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.decode([int(i)]) for i in ids]


class CallableTokenizer(Tokenizer):
    """Any `text -> ids` function, with an optional `ids -> text` inverse.

    Its fingerprint hashes the encodings of a fixed probe text, so a different function is caught even
    under the same name; pass `name` to pin it yourself.
    """

    _PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 ,;:!? éü 中文"

    def __init__(
        self,
        encode: Callable[[str], Sequence[int]],
        decode: Callable[[Sequence[int]], str] | None = None,
        *,
        name: str | None = None,
        vocab_size: int | None = None,
    ):
        self._encode = encode
        self._decode = decode
        qualname: str = getattr(encode, "__qualname__", "callable")
        self.name = name or qualname
        self.max_id = (vocab_size - 1) if vocab_size else 2**32 - 2
        try:
            probe: list[int] | None = [int(i) for i in encode(self._PROBE)]
        except Exception:  # an encoder for another kind of input: the name alone identifies it
            probe = None
        self._fp = _digest({"kind": "callable", "name": self.name, "probe": probe})

    @property
    def fingerprint(self) -> str:
        return self._fp

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        if self._decode is None:
            return " ".join(f"<{int(i)}>" for i in ids)
        return self._decode([int(i) for i in ids])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        if self._decode is None:
            return [(" " if k else "") + f"<{int(i)}>" for k, i in enumerate(ids)]
        return [self._decode([int(i)]) for i in ids]


def as_tokenizer(obj: Any, **kwargs: Any) -> Tokenizer:
    """Wrap `obj` as a Tokenizer: a Tokenizer, "bytes", a transformers tokenizer, a path or a callable."""
    if isinstance(obj, Tokenizer):
        return obj
    if obj is None or (isinstance(obj, str) and obj in ("bytes", "byte", "utf-8")):
        return ByteTokenizer()
    if hasattr(obj, "get_vocab") and hasattr(obj, "encode"):
        return HFTokenizer(obj)
    if isinstance(obj, str | Path):
        path = Path(obj)
        if path.is_file() and path.suffix == ".json":
            return tokenizer_from_config(json.loads(path.read_text()))
        if path.is_dir():
            from ..errors import require

            transformers = require("transformers", "llm")
            return HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        raise CorpusError(
            f"unknown tokenizer {obj!r}; use 'bytes', 'word' (built from the corpus), a tokenizer.json that "
            "sourcetrace wrote, or a local transformers tokenizer folder"
        )
    if callable(obj):
        return CallableTokenizer(obj, **kwargs)
    raise CorpusError(
        f"cannot use {type(obj).__name__} as a tokenizer; pass 'bytes', a transformers tokenizer "
        "or a function text -> token ids"
    )


def tokenizer_from_config(cfg: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer that `Tokenizer.to_config` described."""
    kind = cfg.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer(cfg["vocab"], lowercase=cfg.get("lowercase", False))
    raise CorpusError(f"cannot rebuild a tokenizer of kind {kind!r}; pass the tokenizer explicitly")


def word_boundaries(pieces: Sequence[str]) -> list[bool]:
    """`b[k]` is True when a word boundary lies before token k (`b[0]` and `b[len]` always True)."""
    n = len(pieces)
    out = [True] * (n + 1)
    for k in range(1, n):
        prev, cur = pieces[k - 1], pieces[k]
        out[k] = not prev or not cur or not _is_word_char(prev[-1]) or not _is_word_char(cur[0])
    return out


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"
