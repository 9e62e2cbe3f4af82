"""`sourcetrace demo diffusion`: which training digits made this generated digit?

Trains a class-conditional ε-MLP on scikit-learn's 1,797 digits, generates a few digits from stored noise,
attributes them with D-TRAK (`trak` on `DiffusionTask` with the squared-norm objective) and with an encoded
ensemble, then retrains without each sample's top proponents and resamples from the same noise: the
report shows each generated digit, its proponents and opponents, and that counterfactual beside it.
Everything is cached in the output folder, so a rerun only rewrites the reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

HIDDEN, DEPTH, STEPS, BATCH, LR, T, SAMPLE_STEPS = 128, 3, 800, 128, 3e-3, 1000, 50
LABELS = (3, 5, 8)  # the digits generated
N_MEMBERS = 14  # C(14, 7) = 3432 unique balanced codes for 1,797 images
TOP_REMOVED = 10  # proponents left out for the counterfactual


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(d.target)


def _model(seed: int = 0) -> Any:
    from ..diffusion import EpsMLP

    torch.manual_seed(seed)
    return EpsMLP((1, 8, 8), hidden=HIDDEN, depth=DEPTH, num_classes=10)


def _train(x: torch.Tensor, y: torch.Tensor, keep: Any = None, seed: int = 0) -> Any:
    """An ε-MLP trained on the images at `keep` (all by default)."""
    from ..diffusion import linear_schedule, train_eps_model

    model = _model(seed)
    train_eps_model(model, x, linear_schedule(T), steps=STEPS, batch_size=BATCH, lr=LR, seed=seed, labels=y,
                    keep=keep, progress=True)
    return model


def _trained(path: Path, x: torch.Tensor, y: torch.Tensor, keep: Any = None, seed: int = 0) -> Any:
    """`_train`, cached at `path`."""
    from ..artifacts import atomic_write

    if path.exists():
        model = _model(seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    model = _train(x, y, keep, seed)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model


def _pixels(image: torch.Tensor) -> list[list[float]]:
    return ((image.reshape(8, 8).clamp(-1, 1) + 1) / 2).tolist()


def run(out: Path) -> Path:
    """Train, generate, attribute and write `out`/report.html (D-TRAK) and `out`/ensemble.html."""
    import sourcetrace as st

    from ..diffusion import DiffusionTask, StoredNoise, diffusion_examples, linear_schedule, model_eps, sample
    from ..ensembles import EncodedEnsemble, balanced_codes, train_members
    from ..views import write_report

    torch.set_num_threads(1)
    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    x, y = _digits()
    schedule = linear_schedule(T)
    train = diffusion_examples(x, y)
    print(f"training a class-conditional ε-MLP on {len(x)} digits ({STEPS} Adam steps)")
    model = _trained(out / "models" / "full.pt", x, y)

    labels = torch.tensor(LABELS)
    noise = StoredNoise.draw(len(LABELS), (1, 8, 8), SAMPLE_STEPS, seed=7)
    with torch.no_grad():
        generated = sample(model_eps(model, labels), noise, schedule, num_steps=SAMPLE_STEPS, clip=1.0)
    queries = diffusion_examples(generated, labels, [f"generated {d}" for d in LABELS])

    print("attributing the generated digits with D-TRAK (squared norm of the predicted noise, K=10)")
    task = DiffusionTask(schedule, 10, measurement="square-norm", train_objective="square-norm")
    attr = st.Attributor(model, task, "trak", workdir=out / "d-trak", overwrite=True, proj_dim=2048,
                         curvature="covariance")
    attr.fit(train)
    scores = attr.score(queries)

    # the counterfactual: retrain without each sample's top proponents, resample from the same noise
    counterfactuals = []
    for q, digit in enumerate(LABELS):
        top = [a.index for a in scores.top(q, TOP_REMOVED)]
        keep = np.setdiff1d(np.arange(len(x)), top)
        print(f"retraining without the {TOP_REMOVED} top proponents of the generated {digit}")
        without = _trained(out / "models" / f"without-top-{digit}.pt", x, y, keep=keep)
        with torch.no_grad():
            cf = sample(model_eps(without, labels[q:q + 1]),
                        StoredNoise(noise.start[q:q + 1], noise.steps[:, q:q + 1]), schedule,
                        num_steps=SAMPLE_STEPS, clip=1.0)
        counterfactuals.append(cf[0])
    cf_queries = diffusion_examples(torch.stack(counterfactuals), labels,
                                    [f"generated {d} without its top {TOP_REMOVED}" for d in LABELS])
    both = attr.score(queries + cf_queries)

    train_items = [{"image": _pixels(x[i]), "label": str(int(y[i]))} for i in range(len(x))]
    query_items = [{"image": _pixels(generated[q]), "label": str(d),
                    "compare_to": cf_queries[q]["id"]} for q, d in enumerate(LABELS)]
    query_items += [{"image": _pixels(counterfactuals[q]), "label": str(d)} for q, d in enumerate(LABELS)]
    report = write_report(both, out / "report.html", train_items=train_items, query_items=query_items,
                          title="sourcetrace demo: which training digits made this generated digit? (D-TRAK)")

    print(f"training an encoded ensemble of {N_MEMBERS} members, each on a coded half of the digits")
    codes = balanced_codes(len(x), N_MEMBERS, seed=0)
    members = train_members(lambda idx, j: _train(x, y, keep=idx, seed=100 + j), codes,
                            workdir=out / "ensemble", build_fn=_model)
    ensemble = EncodedEnsemble(members, codes)
    influence = ensemble.influence(noise, schedule, labels=labels, num_steps=SAMPLE_STEPS, clip=1.0,
                                   query_ids=[f"ensemble's {d}" for d in LABELS])
    with torch.no_grad():
        made = ensemble.sample(noise, schedule, labels=labels, num_steps=SAMPLE_STEPS, clip=1.0)
    flags = influence.metadata["unattributable"]
    ens_items = [{"image": _pixels(made[q]), "label": str(d) + (" (unattributable)" if flags[q] else "")}
                 for q, d in enumerate(LABELS)]
    write_report(influence, out / "ensemble.html", train_items=train_items, query_items=ens_items,
                 title="sourcetrace demo: encoded ensemble — how far each digit's removal moves the "
                       "sample (L2)")
    radius = ", ".join(f"{r:.2f}" for r in influence.metadata["radius"])
    print(f"ensemble counterfactual radius per sample: {radius}; reports: {report}, {out / 'ensemble.html'}")
    return report
