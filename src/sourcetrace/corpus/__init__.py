"""Verbatim tracing: index a training corpus, trace generated text into it, mine low-perplexity spans."""

from .index import CorpusIndex, TraceResult
from .mining import Match, MinedSpan, MiningReport, bucket, mine_low_perplexity
from .sources import Document, iter_documents
from .spans import Occurrence, Span
from .tokenizers import ByteTokenizer, CallableTokenizer, HFTokenizer, Tokenizer, WordTokenizer, as_tokenizer

__all__ = [
    "ByteTokenizer",
    "CallableTokenizer",
    "CorpusIndex",
    "Document",
    "HFTokenizer",
    "Match",
    "MinedSpan",
    "MiningReport",
    "Occurrence",
    "Span",
    "Tokenizer",
    "TraceResult",
    "WordTokenizer",
    "as_tokenizer",
    "bucket",
    "iter_documents",
    "mine_low_perplexity",
]
