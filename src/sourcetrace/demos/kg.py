"""`sourcetrace demo kg`: procedural garments, a small conditional VAE, and the triples its generations share.

The images are 16×16 RGB garments drawn from attributes of the shipped fashion ontology (silhouette,
length, colour, pattern, material), so every training image's triples are known by construction; captions
are made from the same attributes. The generator is a conditional VAE on the attributes' one-hot codes,
small enough to retrain in about a second (the benchmark `kg-attribution` retrains it many times);
`GarmentVAETask` makes it a Task, so the gradient methods attribute its generations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

SIZE = 16
ATTRIBUTES: dict[str, list[str]] = {
    "hasSilhouette": ["a-line", "straight", "fitted"],
    "hasLength": ["short", "long"],
    "hasColor": ["red", "blue", "green", "yellow"],
    "hasPattern": ["plain", "striped", "checked", "dotted"],
    "hasMaterialType": ["plain", "knit"],
}
# relations the garments never show: a simulated VLM invents attributes from these
INVENTED: dict[str, list[str]] = {
    "hasNeckline": ["v-neck", "crew neck", "round neck", "boat neck"],
    "hasSleeveLength": ["sleeveless", "short sleeve", "wrist length"],
    "hasOpeningType": ["zip-up", "single breasted", "no opening"],
}
VOCABULARY = {**ATTRIBUTES, **INVENTED}
# a harder schema (benchmark `kg-attribution-overlap`): the pattern's marks drawn in a second colour, so the
# colour values are shared by two relations; hasPatternColor differs from hasColor
TWO_COLOUR: dict[str, list[str]] = {
    "hasSilhouette": ATTRIBUTES["hasSilhouette"],
    "hasLength": ATTRIBUTES["hasLength"],
    "hasColor": ATTRIBUTES["hasColor"],
    "hasPattern": ["striped", "checked", "dotted"],
    "hasPatternColor": ATTRIBUTES["hasColor"],
    "hasMaterialType": ATTRIBUTES["hasMaterialType"],
}
RGB = {
    "red": (0.85, 0.15, 0.15),
    "blue": (0.15, 0.3, 0.9),
    "green": (0.15, 0.7, 0.25),
    "yellow": (0.95, 0.85, 0.1),
}
BACKGROUND = 0.55


def caption(attrs: dict[str, str]) -> str:
    material = "" if attrs["hasMaterialType"] == "plain" else " knit"
    pattern = "" if attrs["hasPattern"] == "plain" else f" {attrs['hasPattern']}"
    if "hasPatternColor" in attrs:
        pattern += f" ({attrs['hasPatternColor']} marks)"
    return (
        f"a {attrs['hasLength']} {attrs['hasColor']}{pattern}{material} garment with "
        f"{'an' if attrs['hasSilhouette'][0] == 'a' else 'a'} {attrs['hasSilhouette']} silhouette"
    )


def render(attrs: dict[str, str], rng: np.random.Generator | None = None) -> np.ndarray:
    """One garment as [16, 16, 3] floats in 0..1; `rng` adds the small jitter of a photographed item."""
    dx = int(rng.integers(-1, 2)) if rng is not None else 0
    top, bottom = 2, (10 if attrs["hasLength"] == "short" else 14)
    img = np.full((SIZE, SIZE, 3), BACKGROUND)
    rows = np.arange(top, bottom + 1)
    frac = (rows - top) / max(1, bottom - top)
    half = {
        "straight": np.full(len(rows), 3.5),
        "a-line": 2.0 + 4.5 * frac,
        "fitted": 4.0 - 2.2 * np.sin(np.pi * frac),
    }[attrs["hasSilhouette"]]
    colour = np.array(RGB[attrs["hasColor"]])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    pattern = attrs["hasPattern"]
    marks, dark = np.zeros((SIZE, SIZE), bool), 1.0
    if pattern == "striped":
        marks, dark = (yy // 2) % 2 == 1, 0.35
    elif pattern == "checked":
        marks, dark = ((yy // 2) + (xx // 2)) % 2 == 1, 0.35
    elif pattern == "dotted":
        marks, dark = (yy % 3 == 1) & (xx % 3 == 1), 0.25
    knit = (
        np.where((xx + yy) % 2 == 0, 1.0, 0.75)
        if attrs["hasMaterialType"] == "knit"
        else np.ones((SIZE, SIZE))
    )
    if "hasPatternColor" in attrs:  # marks in a second colour
        fill = np.where(marks[..., None], np.array(RGB[attrs["hasPatternColor"]]), colour) * knit[..., None]
    else:  # marks in a darker shade of the colour
        fill = colour * (np.where(marks, dark, 1.0) * knit)[..., None]
    centre = SIZE / 2 - 0.5 + dx
    for r, h in zip(rows, half):
        cols = np.abs(np.arange(SIZE) - centre) <= h
        img[r, cols] = fill[r, cols]
    if rng is not None:
        img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1)


def all_combinations(schema: dict[str, list[str]] = ATTRIBUTES) -> list[dict[str, str]]:
    """Every attribute combination of the schema (a pattern colour differs from the garment's colour)."""
    import itertools

    names = list(schema)
    combos = [dict(zip(names, values)) for values in itertools.product(*schema.values())]
    return [a for a in combos if a.get("hasPatternColor") != a["hasColor"]]


def make_garments(per_combination: int = 2, seed: int = 0) -> tuple[np.ndarray, list[dict[str, str]]]:
    """`per_combination` jittered images of each attribute combination: ([n, 16, 16, 3], attributes)."""
    rng = np.random.default_rng(seed)
    attrs = [a for a in all_combinations() for _ in range(per_combination)]
    return np.stack([render(a, rng) for a in attrs]).astype(np.float32), attrs


def sample_garments(
    n: int, tail: float, schema: dict[str, list[str]] = ATTRIBUTES, seed: int = 0
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """`n` garments with long-tailed attributes: the i-th value of a relation has probability ∝ tail**i.

    Each image's relations are drawn independently, but a pattern colour among the colours other than the
    garment's.
    """
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1]; got {tail}")
    rng = np.random.default_rng(seed)
    attrs = []
    for _ in range(n):
        a: dict[str, str] = {}
        for rel, values in schema.items():
            p = tail ** np.arange(len(values), dtype=float)
            if rel == "hasPatternColor":
                p = p * (np.array(values) != a["hasColor"])
            a[rel] = values[rng.choice(len(values), p=p / p.sum())]
        attrs.append(a)
    return np.stack([render(a, rng) for a in attrs]).astype(np.float32), attrs


def condition(attrs: list[dict[str, str]], schema: dict[str, list[str]] = ATTRIBUTES) -> torch.Tensor:
    """The one-hot code of each image's attributes, [n, Σ values per relation] (15 for `ATTRIBUTES`)."""
    parts = []
    for rel, values in schema.items():
        idx = torch.tensor([values.index(a[rel]) for a in attrs])
        parts.append(nn.functional.one_hot(idx, len(values)).float())
    return torch.cat(parts, 1)


class ConditionalVAE(nn.Module):
    """A conditional VAE on flattened images: x, c -> z (8-d) -> x̂."""

    def __init__(self, dim: int = SIZE * SIZE * 3, cond: int = 15, hidden: int = 128, latent: int = 8):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(dim + cond, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent + cond, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
        )

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.cat([z, c], -1)))

    def per_example_loss(self, x: torch.Tensor, c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Negative ELBO of each image with the latent noise given, [B]; noise [B, latent], or [B, M, latent]
        for the mean over M draws (the decoder then sees the [B, M] layout, one example per batch row)."""
        mu, logvar = self.encoder(torch.cat([x, c], -1)).chunk(2, -1)
        if noise.dim() == 3:
            draws = noise.shape[1]
            mu, logvar = mu[:, None], logvar[:, None]
            x, c = x[:, None].expand(-1, draws, -1), c[:, None].expand(-1, draws, -1)
        z = mu + noise * torch.exp(0.5 * logvar)
        recon = nn.functional.binary_cross_entropy(self.decode(z, c), x, reduction="none").sum(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        loss = recon + kl
        return loss.mean(1) if noise.dim() == 3 else loss

    def loss(self, x: torch.Tensor, c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.per_example_loss(x, c, noise).mean()


class GarmentVAETask:
    """The conditional VAE as a Task, so every gradient method of the registry attributes its generations.

    The per-example training loss is the VAE's loss (negative ELBO) with its latent noise fixed per example
    id (`noise_draws` draws, seeded from (seed, id, draw) as `diffusion.example_noise`), so an example's
    loss is the same function in every pass; the measurement is minus it, for a generated image its negative
    ELBO under its prompt's condition. Examples: `examples(images, attrs, ids)`.
    """

    def __init__(
        self, schema: dict[str, list[str]] = ATTRIBUTES, noise_draws: int = 1, seed: int = 0, latent: int = 8
    ):
        if int(noise_draws) < 1:
            raise ValueError(f"noise_draws must be at least 1; got {noise_draws}")
        self.schema, self.noise_draws, self.seed, self.latent = schema, int(noise_draws), int(seed), latent

    def examples(
        self, images: np.ndarray, attrs: list[dict[str, str]], ids: list[Any]
    ) -> list[dict[str, Any]]:
        """One dict per image: the flattened image `x`, its condition `c` and its `id`."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(len(images), -1)
        c = condition(attrs, self.schema)
        return [{"x": x[i], "c": c[i], "id": ids[i]} for i in range(len(ids))]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from ..diffusion import example_noise

        ids = [ex["id"] for ex in examples]
        draws = [
            example_noise(self.seed, i, 0, d, (self.latent,)) for i in ids for d in range(self.noise_draws)
        ]
        noise = torch.stack(draws).reshape(len(ids), self.noise_draws, self.latent)
        return {
            "x": torch.stack([ex["x"] for ex in examples]),
            "c": torch.stack([ex["c"] for ex in examples]),
            "id": ids,
            "noise": noise,
        }

    def train_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["x"]
        vae = cast(ConditionalVAE, model)
        return vae.per_example_loss(x, batch["c"].to(x.dtype), batch["noise"].to(x.dtype))

    def measurement(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return -self.train_loss(model, batch)

    def config(self) -> dict[str, Any]:
        return {
            "task": type(self).__name__,
            "schema": self.schema,
            "noise_draws": self.noise_draws,
            "seed": self.seed,
        }


def train_generator(
    images: np.ndarray,
    attrs: list[dict[str, str]],
    *,
    keep: np.ndarray | None = None,
    epochs: int = 60,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    schema: dict[str, list[str]] = ATTRIBUTES,
) -> ConditionalVAE:
    """Train the generator on the images where `keep` is true (all by default); same seed, same run."""
    torch.manual_seed(seed)
    c = condition(attrs, schema)
    model = ConditionalVAE(cond=c.shape[1])
    x = torch.as_tensor(images).reshape(len(images), -1)
    idx = np.arange(len(images)) if keep is None else np.flatnonzero(keep)
    x, c = x[idx], c[idx]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for ids in torch.randperm(len(x), generator=gen).split(batch):
            noise = torch.randn(len(ids), model.latent, generator=gen)
            opt.zero_grad()
            model.loss(x[ids], c[ids], noise).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def generate(
    model: ConditionalVAE,
    attrs: dict[str, str],
    noise: torch.Tensor,
    schema: dict[str, list[str]] = ATTRIBUTES,
) -> np.ndarray:
    """Images for one prompt from the given latent noise [n, 8]: [n, 16, 16, 3]."""
    c = condition([attrs] * len(noise), schema)
    return model.decode(noise, c).reshape(len(noise), SIZE, SIZE, 3).numpy()


class AttributeReader:
    """Reads the attributes of an image with one softmax regression per relation, fitted on labelled images.

    It stands in for a vision-language model on generated images, whose attributes are not known by
    construction; its mistakes are real ones, and `SceneExtractor` adds the simulated ones on top.
    """

    def __init__(
        self,
        images: np.ndarray,
        attrs: list[dict[str, str]],
        steps: int = 300,
        seed: int = 0,
        schema: dict[str, list[str]] = ATTRIBUTES,
    ):
        torch.manual_seed(seed)
        x = torch.as_tensor(images).reshape(len(images), -1)
        self.schema = schema
        self.heads = {}
        for rel, values in schema.items():
            y = torch.tensor([values.index(a[rel]) for a in attrs])
            head = nn.Linear(x.shape[1], len(values))
            opt = torch.optim.LBFGS(head.parameters(), max_iter=steps)

            def closure(head=head, opt=opt, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            self.heads[rel] = head

    @torch.no_grad()
    def read(self, images: np.ndarray) -> list[dict[str, str]]:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(len(images), -1)
        picks = {rel: head(x).argmax(1).tolist() for rel, head in self.heads.items()}
        return [{rel: self.schema[rel][picks[rel][i]] for rel in self.schema} for i in range(len(images))]


def grey(image: np.ndarray) -> np.ndarray:
    """Luminance of an RGB image (the report draws grey images)."""
    return np.asarray(image) @ np.array([0.299, 0.587, 0.114])


def run(
    out: Path, *, error_rate: float = 0.1, n_prompts: int = 3, generations: int = 4, epochs: int = 30
) -> Path:
    """Train the generator, generate for a few prompts, attribute them by shared triples, write a report.

    Also writes the knowledge graph (`kg.ttl`); the report shows each image's triples beside it (the report
    draws grey images, so colours show only in the triples).
    """
    from ..kg import KGStore, SceneExtractor, kg_scores, load_ontology, shared_text
    from ..views import write_report

    out = Path(out)
    images, attrs = make_garments()
    model = train_generator(images, attrs, epochs=epochs, batch=64)
    reader = AttributeReader(images, attrs)
    ontology = load_ontology("fashion")
    extractor = SceneExtractor(
        ontology, drop=error_rate, confuse=error_rate, invent=error_rate, vocabulary=VOCABULARY
    )
    store = KGStore(ontology)
    store.add_many([(i, extractor.extract(a, f"train {i}").triples) for i, a in enumerate(attrs)])
    rng = np.random.default_rng(1)
    prompts = [attrs[i] for i in rng.choice(len(attrs), n_prompts, replace=False)]
    first: dict[str, np.ndarray] = {}
    noise = torch.randn(generations, 8, generator=torch.Generator().manual_seed(7))
    for p in prompts:
        pics = generate(model, p, noise)
        first[caption(p)] = pics[0]
        ids = [f"{caption(p)} #{g}" for g in range(generations)]
        read = reader.read(pics)
        store.add_many(
            [(i, extractor.extract(r, i).triples) for i, r in zip(ids, read)],
            role="generated",
            prompts=[caption(p)] * generations,
        )
    scores = kg_scores(store, measure="idf-jaccard")
    store.export(out / "kg.ttl")
    generated = store.triples("generated")
    query_items = [
        {
            "image": grey(first[q]),
            "label": "generated",
            "text": f"{q}. First generation's triples: "
            + "; ".join(str(t) for t in sorted(generated[f"{q} #0"][1])),
        }
        for q in scores.query_ids
    ]
    train_items = []
    for i in scores.train_ids:
        item: dict[str, Any] = {"label": caption(attrs[int(i)]), "image": grey(images[int(i)])}
        explained = [q for q in scores.query_ids if i in scores.metadata["shared"][q]]
        if explained:
            item["text"] = " | ".join(
                f"shares with '{q}': " + shared_text(scores, q, i, sep="; ") for q in explained
            )
        train_items.append(item)
    return write_report(
        scores,
        out / "report.html",
        train_items=train_items,
        query_items=query_items,
        title="sourcetrace demo: knowledge-graph attribution of generated garments",
    )
