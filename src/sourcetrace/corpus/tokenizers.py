"""Tokenizers an index can be built with: bytes, a word vocabulary, a Hugging Face tokenizer or a callable.

Every adapter has the same small face (`encode`, `decode`, `pieces`, `encode_with_pieces`, `max_id`,
`fingerprint`), so the index never needs to know which kind it holds. The fingerprint goes into the index
manifest; tracing with a tokenizer whose fingerprint differs is refused.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
        return pieces_by_prefix(self.decode, ids)

    def encode_with_pieces(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids of `text` and one piece of `text` per token, so a trace shows the text as written."""
        ids = self.encode(text)
        return ids, self.pieces(ids)

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

    def encode_with_pieces(self, text: str) -> tuple[list[int], list[str]]:
        folded = text.lower() if self.lowercase else text
        if len(folded) != len(text):  # lowercasing changed the length: offsets would not fit the text
            ids = self.encode(text)
            return ids, self.pieces(ids)
        matches = list(_WORD_RE.finditer(folded))
        ids = [self.index.get(m.group(), 0) for m in matches]
        return ids, pieces_from_offsets(text, [m.span() for m in matches])

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
    """A Hugging Face tokenizer, used as it is (no special tokens added).

    Pieces come from the tokenizer's character offsets, so traces keep the text's own spacing whatever the
    tokenizer's decoder does with a single token (SentencePiece-style decoders drop a leading space).
    """

    def __init__(self, tok: Any):
        self.tok = tok
        self.name = type(tok).__name__
        vocab = tok.get_vocab()
        self.max_id = max(vocab.values()) if vocab else 0
        self.unk_id = None
        try:
            probe: list[int] | None = self.encode(_PROBE)
        except Exception:  # a tokenizer that cannot encode the probe is identified by its vocabulary
            probe = None
        self._fp = _digest({"kind": "hf", "vocab": sorted(vocab.items()), "probe": probe})

    @property
    def fingerprint(self) -> str:
        return self._fp

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids]))

    def _with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
        try:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
            return None
        return [int(i) for i in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]

    def encode_with_pieces(self, text: str) -> tuple[list[int], list[str]]:
        got = self._with_offsets(text)
        if got is None:
            ids = self.encode(text)
            return ids, self.pieces(ids)
        ids, offsets = got
        return ids, pieces_from_offsets(text, offsets)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        text = self.decode(ids)
        got = self._with_offsets(text)
        if got is not None and got[0] == ids:  # the decoded text encodes back to the same tokens
            return pieces_from_offsets(text, got[1])
        return pieces_by_prefix(self.decode, ids)

    def save(self, folder: Path) -> dict[str, Any]:
        self.tok.save_pretrained(str(folder))
        return {"kind": "hf", "folder": folder.name}


class CallableTokenizer(Tokenizer):
    """Any `text -> ids` function, with an optional `ids -> text` inverse.

    Its fingerprint hashes the encodings of a fixed probe text, so a different function is caught even
    under the same name; pass `name` to pin it yourself.
    """

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
            probe: list[int] | None = [int(i) for i in encode(_PROBE)]
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
        return pieces_by_prefix(self.decode, ids)


_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 ,;:!? éü 中文"
TOKENIZER_HELP = (
    "'bytes', 'word' (a vocabulary made from the corpus, at build time), a Hugging Face tokenizer.json "
    "file or a local Hugging Face tokenizer folder (AutoTokenizer)"
)


def as_tokenizer(obj: Any, **kwargs: Any) -> Tokenizer:
    """Wrap `obj` as a Tokenizer: a Tokenizer, "bytes", a Hugging Face tokenizer (object, tokenizer.json
    file or folder), a tokenizer config sourcetrace stored beside an index, or a callable."""
    if isinstance(obj, Tokenizer):
        return obj
    if obj is None or (isinstance(obj, str) and obj in ("bytes", "byte", "utf-8")):
        return ByteTokenizer()
    if hasattr(obj, "get_vocab") and hasattr(obj, "encode"):
        return HFTokenizer(obj)
    if isinstance(obj, str) and obj == "word":
        raise CorpusError(
            "'word' names a vocabulary made from the corpus when an index is built, and the index stores "
            "it; to use it, pass tokenizer=None"
        )
    if isinstance(obj, str | Path):
        path = Path(obj)
        if path.is_file() and path.suffix == ".json":
            return _from_json_file(path)
        if path.is_dir():
            return _from_folder(path)
        raise CorpusError(f"unknown tokenizer {str(obj)!r}; use {TOKENIZER_HELP}")
    if callable(obj):
        return CallableTokenizer(obj, **kwargs)
    raise CorpusError(
        f"cannot use {type(obj).__name__} as a tokenizer; pass 'bytes', a Hugging Face tokenizer "
        "or a function text -> token ids"
    )


def _from_json_file(path: Path) -> Tokenizer:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusError(f"{path} is not a tokenizer.json ({exc}); use {TOKENIZER_HELP}") from exc
    if isinstance(cfg, dict) and "kind" in cfg:  # what sourcetrace stores beside an index
        return tokenizer_from_config(cfg, path.parent)
    if not (isinstance(cfg, dict) and "model" in cfg):
        raise CorpusError(
            f"{path} is not a Hugging Face tokenizer.json (it has no 'model'); use {TOKENIZER_HELP}"
        )
    from ..errors import require

    transformers = require("transformers", "llm")
    try:
        return HFTokenizer(transformers.PreTrainedTokenizerFast(tokenizer_file=str(path)))
    except Exception as exc:  # the tokenizers library's own parse errors
        raise CorpusError(f"cannot load the Hugging Face tokenizer {path}: {exc}") from exc


def _from_folder(path: Path) -> Tokenizer:
    if (path / STORED).is_file():  # an index folder, or a folder holding a config sourcetrace wrote
        return _from_json_file(path / STORED)
    old = path / "tokenizer.json"  # an index built before the config was renamed
    if (
        old.is_file()
        and (path / "manifest.json").is_file()
        and '"kind"' in old.read_text(encoding="utf-8")[:200]
    ):
        return _from_json_file(old)
    from ..errors import require

    transformers = require("transformers", "llm")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # missing files, unknown tokenizer class, ...
        raise CorpusError(
            f"cannot load a Hugging Face tokenizer from {path} ({type(exc).__name__}: {exc}); "
            "the folder needs a tokenizer.json or the files AutoTokenizer reads"
        ) from exc
    return HFTokenizer(tok)


#: the name of the tokenizer description sourcetrace writes beside an index
STORED = "sourcetrace-tokenizer.json"


def save_tokenizer(tok: Tokenizer, folder: Path) -> dict[str, Any] | None:
    """Store `tok` in `folder` so the index opens without naming it; None when it cannot be stored."""
    if isinstance(tok, HFTokenizer):
        return tok.save(folder / "hf-tokenizer")
    return tok.to_config()


def tokenizer_from_config(cfg: dict[str, Any], base: Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer that `save_tokenizer` described (`base`: the folder it was stored in)."""
    kind = cfg.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer(cfg["vocab"], lowercase=cfg.get("lowercase", False))
    if kind == "hf" and base is not None:
        return _from_folder(base / cfg["folder"])
    raise CorpusError(f"cannot rebuild a tokenizer of kind {kind!r}; pass the tokenizer explicitly")


# ---------------------------------------------------------------------- pieces and word edges


def pieces_from_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Split `text` into one piece per token from (start, end) character offsets.

    Each token's piece runs from the previous token's end to its own end, so the whitespace a tokenizer
    leaves out of its offsets goes with the token after it, and the pieces join to `text` exactly.
    """
    out, prev = [], 0
    for _, end in offsets:
        end = max(prev, min(int(end), len(text)))
        out.append(text[prev:end])
        prev = end
    if out:
        out[-1] += text[prev:]
    return out


def pieces_by_prefix(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[str]:
    """Pieces from decoding growing prefixes: piece k is what token k adds to the decoded text.

    When a token changes text already shown (a character completed across tokens), the earlier pieces
    are cut back to the common prefix, so the pieces always join to `decode(ids)`.
    """
    ids = [int(i) for i in ids]
    out: list[str] = []
    shown = ""
    for k in range(len(ids)):
        cur = decode(ids[: k + 1])
        keep = len(os.path.commonprefix([shown, cur]))
        cut = len(shown) - keep
        j = len(out) - 1
        while cut > 0 and j >= 0:
            drop = min(cut, len(out[j]))
            out[j] = out[j][: len(out[j]) - drop]
            cut -= drop
            j -= 1
        out.append(cur[keep:])
        shown = cur
    return out


def word_edges(pieces: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Where a span may start and end so that it begins and ends with a whole word.

    `start[k]`: a span may begin at token k (its first word character starts a word); `end[k]`: a span
    may end before token k (the last word character of token k - 1 ends a word). Whitespace and
    punctuation at a span's edges are never part of it, so a passage is the same span whatever surrounds
    it. A token whose piece is empty (the first bytes of a multi-byte character) goes with the token that
    completes it, so no span cuts a character.
    """
    n = len(pieces)
    start = np.zeros(n + 1, dtype=bool)
    end = np.zeros(n + 1, dtype=bool)
    units: list[tuple[int, int, str]] = []  # (first token, one past the last token, text)
    first = 0
    for k, p in enumerate(pieces):
        if p:
            units.append((first, k + 1, p))
            first = k + 1
    for j, (a, b, text) in enumerate(units):
        word = [i for i, ch in enumerate(text) if _is_word_char(ch)]
        if not word:
            continue
        joined_before = j > 0 and _is_word_char(units[j - 1][2][-1])
        joined_after = j + 1 < len(units) and _is_word_char(units[j + 1][2][0])
        start[a] = word[0] > 0 or not joined_before
        end[b] = word[-1] < len(text) - 1 or not joined_after
    return start, end


def count_words(text: str) -> int:
    """Words in `text`: runs of letters, digits and underscores (the unit of span lengths)."""
    return len(_WORDS.findall(text))


_WORDS = re.compile(r"\w+", re.UNICODE)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"
