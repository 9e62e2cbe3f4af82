"""`sourcetrace demo music`: Bach chorales rendered to audio, a tiny symbolic generator trained on them with
a few pieces planted (duplicated) so that it reproduces them, and similarity attribution of what it makes.

The chorales come with music21 (symbolic scores in its wheel, no download); a small additive synthesiser
renders the four voices in one of several timbres. The generator is a small transformer over note tokens:
an eighth-note grid of the four voices (soprano, alto, tenor, bass), each step one token per voice (a
pitch, "hold" or "rest").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOICES = ("Soprano", "Alto", "Tenor", "Bass")
LOW, HIGH = 28, 92  # MIDI pitches the tokens can hold
HOLD, REST, BOS = HIGH - LOW + 1, HIGH - LOW + 2, HIGH - LOW + 3
VOCAB = BOS + 1
STEP = 0.5  # quarter notes per grid step (an eighth note)


@dataclass
class Chorale:
    """A chorale as notes: (onset in quarter notes, duration, MIDI pitch, voice 0–3)."""

    name: str
    notes: list[tuple[float, float, int, int]]


def load_chorales(n: int, cache: Path | None = None, quarters: float = 32.0) -> list[Chorale]:
    """The first `n` four-voice Bach chorales of music21's corpus, cut to `quarters` quarter notes.

    Parsing is slow (about a second a piece), so the notes are cached as JSON in `cache` when given.
    """
    from ..errors import require

    path = cache / f"chorales-{n}-{quarters:g}.json" if cache is not None else None
    if path is not None and path.exists():
        return [Chorale(c["name"], [tuple(x) for x in c["notes"]]) for c in json.loads(path.read_text())]
    music21 = require("music21", "audio")
    out: list[Chorale] = []
    for p in sorted(music21.corpus.getComposer("bach"), key=lambda p: p.name):
        if len(out) == n:
            break
        if p.suffix not in (".mxl", ".xml", ".musicxml"):
            continue
        score = music21.corpus.parse(str(p))
        parts = {part.partName: part for part in score.parts}
        if not all(v in parts for v in VOICES):
            continue
        notes = []
        for voice, name in enumerate(VOICES):
            for note in parts[name].flatten().notes:
                onset = float(note.offset)
                if onset >= quarters or note.isChord:
                    continue
                dur = min(float(note.quarterLength), quarters - onset)
                if dur > 0 and LOW <= note.pitch.midi <= HIGH:
                    notes.append((onset, dur, int(note.pitch.midi), voice))
        if notes:
            out.append(Chorale(p.stem, notes))
    if path is not None:
        from ..artifacts import atomic_write_json

        atomic_write_json(path, [{"name": c.name, "notes": c.notes} for c in out])
    return out


# ---- synthesis ---------------------------------------------------------------------------------------------
# timbre -> (harmonic amplitudes, attack s, decay per second (0: sustained), vibrato depth)
TIMBRES: dict[str, tuple[tuple[float, ...], float, float, float]] = {
    "organ": ((1.0, 0.5, 0.35, 0.1, 0.25, 0.05, 0.12), 0.02, 0.0, 0.0),
    "strings": (tuple(1.0 / k for k in range(1, 9)), 0.08, 0.0, 0.004),
    "piano": ((1.0, 0.6, 0.3, 0.2, 0.1, 0.05), 0.005, 2.5, 0.0),
    "clarinet": ((1.0, 0.05, 0.45, 0.04, 0.25, 0.02, 0.12), 0.04, 0.0, 0.002),
}


def synthesize(notes: list[tuple[float, float, int, int]], timbre: str = "organ", sample_rate: int = 16000,
               bpm: float = 90.0, quarters: float | None = None) -> np.ndarray:
    """Render notes additively: each note a sum of harmonics with an attack, a decay or sustain, and a short
    release; peak-normalised to 0.8."""
    harmonics, attack, decay, vibrato = TIMBRES[timbre]
    spq = 60.0 / bpm  # seconds per quarter note
    end = quarters if quarters is not None else max(o + d for o, d, _, _ in notes)
    out = np.zeros(int(end * spq * sample_rate) + sample_rate // 4)
    for onset, dur, pitch, _ in notes:
        start = int(onset * spq * sample_rate)
        n = min(int(dur * spq * sample_rate), len(out) - start)
        if n <= 0:
            continue
        t = np.arange(n) / sample_rate
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        phase = 2 * np.pi * f0 * (t + vibrato * np.sin(2 * np.pi * 5.5 * t) / (2 * np.pi * 5.5) * 2 * np.pi)
        wave = sum(a * np.sin(k * phase) for k, a in enumerate(harmonics, 1) if k * f0 < sample_rate / 2)
        env = np.minimum(1.0, t / attack) * (np.exp(-decay * t) if decay else 1.0)
        env *= np.minimum(1.0, (n - np.arange(n)) / (0.02 * sample_rate))  # 20 ms release: no clicks
        out[start:start + n] += wave * env
    peak = float(np.abs(out).max())
    return (0.8 * out / peak if peak > 0 else out).astype(np.float32)


# ---- tokens ----------------------------------------------------------------------------------------------
def to_tokens(chorale: Chorale, steps: int = 64) -> np.ndarray:
    """[BOS, then per eighth-note step the tokens of S, A, T, B]: a pitch where a note starts, HOLD while it
    sounds, REST when the voice is silent."""
    grid = np.full((steps, 4), REST, dtype=np.int64)
    for onset, dur, pitch, voice in chorale.notes:
        a, b = int(round(onset / STEP)), int(round((onset + dur) / STEP))
        if a >= steps or b <= a:
            continue
        grid[a, voice] = pitch - LOW
        grid[a + 1:min(b, steps), voice] = HOLD
    return np.concatenate([[BOS], grid.ravel()])


def from_tokens(tokens: np.ndarray) -> list[tuple[float, float, int, int]]:
    """Notes of a token sequence (the inverse of `to_tokens`; a HOLD after a REST is a rest)."""
    grid = np.asarray(tokens[1:])
    grid = grid[: len(grid) // 4 * 4].reshape(-1, 4)
    notes = []
    for voice in range(4):
        current: list[Any] | None = None
        for step, tok in enumerate(grid[:, voice]):
            if tok == HOLD and current is not None:
                current[1] += STEP
                continue
            if current is not None:
                notes.append(tuple(current))
                current = None
            if tok < HOLD:
                current = [step * STEP, STEP, int(tok) + LOW, voice]
        if current is not None:
            notes.append(tuple(current))
    return sorted(notes)  # type: ignore[arg-type]


# ---- the generator -----------------------------------------------------------------------------------------
def make_generator(context: int = 257, width: int = 96, layers: int = 2, heads: int = 4,
                   seed: int = 0) -> Any:
    """A small causal transformer over note tokens."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, width)
            self.pos = nn.Embedding(context, width)
            self.voice = nn.Embedding(5, width)  # which voice a position holds (BOS is its own)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.Linear(width, VOCAB)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]
            pos = torch.arange(n)
            voice = torch.where(pos == 0, 4, (pos - 1) % 4)
            h = self.tok(x) + self.pos(pos) + self.voice(voice)
            mask = nn.Transformer.generate_square_subsequent_mask(n)
            return self.out(self.body(h, mask=mask, is_causal=True))

    return Generator()


def train_generator(sequences: np.ndarray, steps: int = 400, batch: int = 16, lr: float = 3e-3, seed: int = 0,
                    progress: bool = True, **kw: Any) -> Any:
    """Train the generator by next-token prediction on `sequences` [n, length] (all of equal length)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    model = make_generator(context=sequences.shape[1], seed=seed, **kw)
    data = torch.from_numpy(np.asarray(sequences, dtype=np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="train generator", unit="step", disable=not progress):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def generate(model: Any, prompt: np.ndarray, length: int, temperature: float = 0.8,
             seed: int = 0) -> np.ndarray:
    """Continue `prompt` (starting with BOS) to `length` tokens by sampling."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(prompt, dtype=np.int64))[None]
    with torch.no_grad():
        while x.shape[1] < length:
            logits = model(x)[0, -1] / temperature
            logits[BOS] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            x = torch.cat([x, nxt[None]], dim=1)
    return x[0].numpy()


def token_agreement(a: np.ndarray, b: np.ndarray, prompt: int) -> float:
    """Share of generated positions (after the prompt) where two sequences hold the same token."""
    n = min(len(a), len(b))
    return float(np.mean(a[prompt:n] == b[prompt:n]))


# ---- the demo ----------------------------------------------------------------------------------------------
@dataclass
class MusicSetting:
    """Sizes of the demo (the benchmark reuses it at other sizes)."""

    pieces: int = 24
    planted: int = 2
    copies: int = 12
    steps: int = 64
    sample_rate: int = 16000
    bpm: float = 90.0
    generator_steps: int = 250
    prompt_steps: int = 4  # eighth-note steps of the planted piece given as the prompt
    seed: int = 0


def timbre_of(i: int) -> str:
    return list(TIMBRES)[i % len(TIMBRES)]


def render_training_set(chorales: list[Chorale], folder: Path, setting: MusicSetting) -> list[Path]:
    """Each chorale rendered in one timbre (cycling through them) to `folder/NAME.wav`."""
    import soundfile as sf

    from ..artifacts import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(chorales):
        path = folder / f"{c.name}.wav"
        if not path.exists():
            audio = synthesize(c.notes, timbre_of(i), setting.sample_rate, setting.bpm, setting.steps * STEP)
            atomic_write(path, functools.partial(sf.write, data=audio, samplerate=setting.sample_rate,
                                                 format="WAV"))
        paths.append(path)
    return paths


def planted_training_tokens(chorales: list[Chorale], setting: MusicSetting) -> tuple[np.ndarray, list[int]]:
    """Token sequences of every chorale, the first `planted` of every fourth piece repeated `copies` times."""
    tokens = np.stack([to_tokens(c, setting.steps) for c in chorales])
    planted = list(range(0, len(chorales), 4))[: setting.planted]
    extra = np.repeat(tokens[planted], setting.copies - 1, axis=0)
    return np.concatenate([tokens, extra]), planted


def run(out: Path, setting: MusicSetting | None = None, progress: bool = True) -> Path:
    """The demo: chorales, planted generator, generations, index, attribution and report in `out`."""
    from rich.console import Console

    from ..similarity import build_audio_index, make_embedder, query_samples, write_audio_report
    from ..similarity.embedders import DEFAULT_EMBEDDER

    console = Console(quiet=not progress)
    setting = setting or MusicSetting()
    out.mkdir(parents=True, exist_ok=True)
    chorales = load_chorales(setting.pieces, cache=out, quarters=setting.steps * STEP)
    console.print(f"{len(chorales)} Bach chorales from music21 (first {setting.steps * STEP:g} quarter "
                  "notes), "
                  f"rendered in {len(TIMBRES)} timbres")
    render_training_set(chorales, out / "train", setting)
    tokens, planted = planted_training_tokens(chorales, setting)
    console.print(f"training a small transformer on their note tokens, with {len(planted)} pieces planted "
                  f"({setting.copies} copies each): {', '.join(chorales[i].name for i in planted)}")
    model = train_generator(tokens, steps=setting.generator_steps, seed=setting.seed, progress=progress)
    prompt = 1 + 4 * setting.prompt_steps
    queries, labels = [], []
    embedder = make_embedder(DEFAULT_EMBEDDER, sample_rate=setting.sample_rate)
    index = build_audio_index(out / "train", out / "index", embedder, overwrite=True, progress=False)
    unplanted = [i for i in range(len(chorales)) if i not in planted][:2]
    for j, i in enumerate([*planted, *unplanted]):
        seq = generate(model, to_tokens(chorales[i], setting.steps)[:prompt], len(tokens[0]), seed=j)
        agree = token_agreement(seq, to_tokens(chorales[i], setting.steps), prompt)
        audio = synthesize(from_tokens(seq), timbre_of(j + 1), setting.sample_rate, setting.bpm,
                           setting.steps * STEP)
        kind = "planted" if i in planted else "unplanted"
        label = f"prompt: {chorales[i].name}, {kind}, {agree:.0%} of tokens as the source"
        q = query_samples(audio, setting.sample_rate, index, k=5, embedder=embedder, name=f"generation {j}")
        queries.append(q)
        labels.append(label)
        best = q.matches[0]
        console.print(f"generation {j} ({label}): nearest training track {best.track} ({best.score:.3f}) "
                      f"at {best.train_offset:.1f} s")
    return write_audio_report(queries, index, out / "report.html", labels=labels,
                              title="sourcetrace demo: which Bach chorales does the generator copy?")
