"""Extractors: an image in, its ontology-aligned triples out (`Alignment`), behind one protocol.

- `VLMExtractor` asks any OpenAI-compatible chat endpoint (Ollama, vLLM, llama.cpp server) about the image
  with the ontology's prompt, parses the answer (JSON mode when the server offers it, the numbered-triple
  format otherwise), retries what fails, times out, and caches answers per image hash.
- `SceneExtractor` turns attributes known by construction (procedural images) into triples, with an error
  model that drops, confuses and invents attributes at set rates, to simulate a VLM's mistakes.

An extractor returns a complete answer or raises `ExtractionError`; a truncated or unreadable answer never
yields triples, so nothing half-read reaches the store.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..artifacts import atomic_write_json, check_manifest, read_json
from ..errors import SourcetraceError
from .align import Aligner, Alignment
from .ontology import Ontology


class ExtractionError(SourcetraceError, RuntimeError):
    """An extractor that could not get a complete, readable answer."""


@runtime_checkable
class Extractor(Protocol):
    ontology: Ontology

    def extract(self, image: Any, image_id: Any = None) -> Alignment:
        """The aligned triples of one image."""
        ...


# ---- the scene extractor (procedural images) ------------------------------------------------------------
class SceneExtractor:
    """Triples from attributes known by construction, `{relation: value}`, with simulated VLM errors.

    For each true attribute: with probability `drop` it is left out; otherwise with probability `confuse` its
    value is replaced by another value of the same relation (from `vocabulary`, default the ontology's);
    and with probability `invent` one attribute of a relation the image lacks is made up. The errors are a
    deterministic function of (`seed`, image id), so a rerun extracts the same triples.
    """

    def __init__(
        self,
        ontology: Ontology,
        *,
        drop: float = 0.0,
        confuse: float = 0.0,
        invent: float = 0.0,
        seed: int = 0,
        vocabulary: Mapping[str, list[str]] | None = None,
    ):
        for name, p in (("drop", drop), ("confuse", confuse), ("invent", invent)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {p}")
        self.ontology, self.drop, self.confuse, self.invent, self.seed = ontology, drop, confuse, invent, seed
        vocab = vocabulary or {r.name: r.value_labels() for r in ontology.relations.values()}
        for rel, values in vocab.items():
            allowed = set(ontology.relation(rel).value_labels())
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"vocabulary values {bad} are not allowed for {rel} in {ontology.name!r}")
        self.vocabulary = {rel: sorted(values) for rel, values in vocab.items()}
        self.aligner = Aligner(ontology)

    def extract(self, image: Mapping[str, str], image_id: Any = None) -> Alignment:
        if not isinstance(image, Mapping):
            raise TypeError("SceneExtractor reads attributes known by construction: give {relation: value}")
        key = f"{self.seed}|{image_id if image_id is not None else sorted(image.items())}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        pairs = []
        for rel, value in sorted(image.items()):
            drop, confuse, invent = rng.random(), rng.random(), rng.random()
            if drop >= self.drop:
                others = [v for v in self.vocabulary.get(rel, []) if v != value]
                pairs.append((rel, rng.choice(others) if confuse < self.confuse and others else value))
            if invent < self.invent:
                free = [r for r in self.vocabulary if r not in image]
                if free:
                    made_up = rng.choice(free)
                    pairs.append((made_up, rng.choice(self.vocabulary[made_up])))
        return self.aligner.align(pairs)


# ---- parsing a VLM's answer -----------------------------------------------------------------------------
_NUMBERED = re.compile(
    r"^\s*\d+\s*[.)]\s*\(?\s*([^,()]+?)\s*,\s*([^,()]+?)\s*,\s*([^()]+?)\s*\)?\s*[.;,]?\s*$"
)
_OBJECT = re.compile(r'\{\s*"relation"\s*:\s*"([^"]*)"\s*,\s*"value"\s*:\s*"([^"]*)"\s*\}')


def parse_answer(text: str) -> tuple[list[tuple[str, str]], bool]:
    """(relation, value) pairs in a model's answer, and whether the answer was complete.

    Reads JSON (`{"triples": [{"relation", "value"}]}`, a list of such objects or of [subject, relation,
    value], or `{relation: value}`), possibly inside a code fence, else numbered lines `1. (s, r, v)`. JSON
    cut off before its end is incomplete (its whole objects are returned for the error message only).
    """
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip())
    start = min([i for i in (body.find("{"), body.find("[")) if i >= 0], default=-1)
    if start >= 0:
        try:
            return _pairs_from_json(json.loads(body[start:])), True
        except (json.JSONDecodeError, TypeError, ValueError):
            # JSON with trailing prose: the first balanced value
            try:
                value, _ = json.JSONDecoder().raw_decode(body[start:])
                return _pairs_from_json(value), True
            except (json.JSONDecodeError, TypeError, ValueError):
                pass
    numbered = [m.groups() for m in map(_NUMBERED.match, body.splitlines()) if m]
    if numbered:
        return [(r, v) for _, r, v in numbered], True
    if start >= 0:  # JSON that never closes: cut off
        return [(m.group(1), m.group(2)) for m in _OBJECT.finditer(body)], False
    return [], False


def _pairs_from_json(obj: Any) -> list[tuple[str, str]]:
    if isinstance(obj, dict) and "triples" in obj:
        obj = obj["triples"]
    pairs: list[tuple[str, str]] = []
    if isinstance(obj, dict):  # {relation: value or [values]}
        for rel, val in obj.items():
            for v in val if isinstance(val, list) else [val]:
                pairs.append((str(rel), "" if v is None else str(v)))
        return pairs
    if not isinstance(obj, list):
        raise ValueError("not a list of triples")
    for item in obj:
        if isinstance(item, dict):
            rel = item.get("relation", item.get("predicate", item.get("p")))
            val = item.get("value", item.get("object", item.get("o")))
            pairs.append(("" if rel is None else str(rel), "" if val is None else str(val)))
        elif isinstance(item, (list, tuple)) and len(item) in (2, 3):
            pairs.append((str(item[-2]), str(item[-1])))
        else:
            raise ValueError(f"not a triple: {item!r}")
    return pairs


def image_bytes(image: Any) -> tuple[bytes, str]:
    """(encoded bytes, MIME type) of a path, bytes, a PIL image or an array (H×W[×3], 0..1 or 0..255)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ExtractionError(f"image file {str(path)!r} does not exist")
        data = path.read_bytes()
        return data, _mime(data)
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), _mime(bytes(image))
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=float)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)  # channels first
        if a.max(initial=0) <= 1.0:
            a = a * 255
        image = Image.fromarray(np.clip(a, 0, 255).astype("uint8").squeeze())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def _mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ExtractionError("image bytes are not PNG, JPEG or WebP")


# ---- the VLM extractor ----------------------------------------------------------------------------------
class VLMExtractor:
    """Triples from any OpenAI-compatible chat endpoint (`base_url` like http://127.0.0.1:11434/v1).

    json_mode: True asks for `response_format={"type": "json_object"}`, False asks for numbered triples,
    "auto" tries JSON mode and falls back (for good) when the server rejects it. A request that times out,
    fails with a 5xx/429, or returns an unreadable or truncated answer is retried `retries` times (waiting
    `backoff` · 2^attempt seconds), then `ExtractionError` is raised. `cache_dir` keeps each answer by the
    image's SHA-256; a cache made for another model, prompt or ontology is refused.
    """

    def __init__(
        self,
        ontology: Ontology,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        json_mode: bool | str = "auto",
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        cache_dir: str | os.PathLike | None = None,
        aligner: Aligner | None = None,
    ):
        if json_mode not in (True, False, "auto"):
            raise ValueError(f"json_mode must be True, False or 'auto'; got {json_mode!r}")
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must be an http(s) URL like http://127.0.0.1:11434/v1; got {base_url!r}"
            )
        if retries < 0 or timeout <= 0:
            raise ValueError("retries must be >= 0 and timeout > 0")
        self.ontology, self.model, self.api_key = ontology, model, api_key
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.json_mode, self.timeout, self.retries, self.backoff = json_mode, timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.aligner = aligner or Aligner(ontology)
        self.requests = 0  # sent so far, for tests and logs
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            check_manifest(
                self.cache_dir,
                {
                    "kind": "sourcetrace vlm cache",
                    "model": model,
                    "ontology": ontology.iri,
                    "prompt": _sha(ontology.prompt()),
                    "text_prompt": _sha(ontology.prompt(json_mode=False)),
                },
                what="VLM answer cache",
            )

    def extract(self, image: Any, image_id: Any = None) -> Alignment:
        data, mime = image_bytes(image)
        digest = hashlib.sha256(data).hexdigest()
        cached = self.cache_dir / f"{digest}.json" if self.cache_dir is not None else None
        if cached is not None and cached.exists():
            return self.aligner.align([tuple(p) for p in read_json(cached)["pairs"]])
        pairs, answer = self._ask(data, mime, image_id)
        if cached is not None:
            atomic_write_json(
                cached, {"pairs": [list(p) for p in pairs], "answer": answer, "image": str(image_id)}
            )
        return self.aligner.align(pairs)

    def _ask(self, data: bytes, mime: str, image_id: Any) -> tuple[list[tuple[str, str]], str]:
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        problems: list[str] = []
        attempt = 0
        while attempt <= self.retries:
            use_json = self.json_mode is not False
            body = {
                "model": self.model,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": self.ontology.prompt(json_mode=use_json)},
                            {"type": "image_url", "image_url": {"url": uri}},
                        ],
                    }
                ],
            }
            if use_json:
                body["response_format"] = {"type": "json_object"}
            try:
                reply = self._post(body)
            except urllib.error.HTTPError as exc:
                if exc.code == 400 and self.json_mode == "auto":
                    self.json_mode = False  # the server does not offer JSON mode: ask for numbered triples
                    continue
                if exc.code not in (408, 429) and exc.code < 500:
                    raise ExtractionError(
                        f"{self.url} answered HTTP {exc.code} for image {image_id!r}: "
                        f"{_read_error(exc)}; check base_url, model and api_key"
                    ) from exc
                problems.append(f"HTTP {exc.code}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                problems.append(f"no answer within {self.timeout:g} s" if _is_timeout(exc) else f"{exc}")
            else:
                try:
                    choice = reply["choices"][0]
                    text = choice["message"]["content"] or ""
                except (KeyError, IndexError, TypeError):
                    problems.append("a reply without choices[0].message.content")
                else:
                    pairs, complete = parse_answer(text)
                    if complete and choice.get("finish_reason") != "length":
                        return pairs, text
                    problems.append(
                        "a truncated answer"
                        if pairs or choice.get("finish_reason") == "length"
                        else f"an unreadable answer ({text[:60]!r})"
                    )
            attempt += 1
            if attempt <= self.retries and self.backoff > 0:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise ExtractionError(
            f"no complete answer for image {image_id!r} from {self.url} after "
            f"{self.retries + 1} tries: {'; '.join(problems)}; raise retries= or timeout=, or "
            "check that the model follows the prompt"
        )

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        self.requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return {"unreadable": raw[:60].decode(errors="replace")}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(
        getattr(exc, "reason", None), (TimeoutError, socket.timeout)
    )


def _read_error(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read()[:200].decode(errors="replace")
    except Exception:
        return exc.reason or ""
