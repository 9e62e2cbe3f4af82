"""Settings with planted problems whose answers are known: the test bed of the insights and of the
`practitioner-tasks` benchmark, and the example behind `sourcetrace whatif FOLDER --example`.

Each data set has classes made of two sub-populations (subclasses). Planted:
- an undersampled sub-population: only `n_rare` of its rows stay in training; the rest are queries and
  acquisition candidates (the pool);
- a responsible group: `n_poison` near-copies of another subclass's rows labelled as a wrong class, all from
  one source ("batch-P"), so that the slice made of that subclass is misclassified; other rows come from
  20 ordinary sources;
- a shortcut: an extra column that is 1 on half of one class's training rows and 0 elsewhere;
- 10 % flipped labels among the other training rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidOptionError
from .setting import Setting


@dataclass(eq=False)
class Planted:
    """A setting and what was planted in it (positions into its training rows / queries)."""

    setting: Setting
    flipped: np.ndarray
    true_labels: np.ndarray  # training labels before flipping
    shortcut_rows: np.ndarray
    shortcut_class: int
    x_shortcut: np.ndarray  # other-class queries with the shortcut column set
    y_shortcut: np.ndarray
    poison_rows: np.ndarray
    poison_source: str
    slice_subclass: str  # the subclass whose queries the poison misclassifies
    rare_subclass: str
    rare_rows: np.ndarray
    tune: np.ndarray  # query positions for tuning
    report: np.ndarray  # query positions for reporting
    info: dict = field(default_factory=dict)


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1], with two k-means sub-populations per digit."""
    from sklearn.datasets import load_digits

    from .groups import feature_clusters

    d = load_digits()
    x, y = d.data / 16.0, d.target.astype(np.int64)
    sub = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        rows = np.flatnonzero(y == c)
        sub[rows] = feature_clusters(x[rows], 2, seed=seed)
    return x, y, sub


def tabular_data(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Gaussian mixture: 4 classes × 2 subclasses in 8 dimensions, unit spread, centres 2.5 apart on
    average."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.8, size=(4, 2, 8))
    y = rng.integers(0, 4, n)
    sub = rng.integers(0, 2, n)
    x = centres[y, sub] + rng.normal(0, 1.0, size=(n, 8))
    return x, y.astype(np.int64), sub.astype(np.int64)


def plant(
    x: np.ndarray,
    y: np.ndarray,
    sub: np.ndarray,
    *,
    name: str,
    n_train: int = 900,
    n_query: int = 500,
    n_rare: int = 3,
    n_pool: int = 40,
    n_poison: int = 30,
    n_slice: int = 60,
    flip: float = 0.1,
    shortcut_class: int = 1,
    seed: int = 0,
    wd: float = 1e-3,
) -> Planted:
    """Split (x, y, subclass) into training rows, queries and a pool, and plant the four problems."""
    rng = np.random.default_rng(seed)
    classes = int(y.max()) + 1
    if classes < 3:
        raise InvalidOptionError("planting needs at least 3 classes")
    subname = np.array([f"c{c}s{s}" for c, s in zip(y, sub)])
    rare_class, slice_class = (shortcut_class + 1) % classes, (shortcut_class + 2) % classes
    rare, slice_name = f"c{rare_class}s1", f"c{slice_class}s0"
    wrong = (slice_class + 1) % classes
    order = rng.permutation(len(y))
    rare_all = order[subname[order] == rare]
    slice_all = order[subname[order] == slice_name]
    n_slice_q = min(len(slice_all) // 2, n_slice)
    rare_train, rare_rest = rare_all[:n_rare], rare_all[n_rare:]
    pool_rows = rare_rest[:n_pool]
    rare_query = rare_rest[n_pool : n_pool + n_slice // 2]
    poison_src, slice_query = slice_all[n_slice_q : n_slice_q + n_poison], slice_all[:n_slice_q]
    used = set(rare_all) | set(slice_all[: n_slice_q + n_poison])
    rest = np.array([i for i in order if i not in used])
    n_common_q = n_query - len(rare_query) - len(slice_query)
    query = np.concatenate([rare_query, slice_query, rest[:n_common_q]])
    query = query[rng.permutation(len(query))]
    rest = rest[n_common_q:]
    train = np.concatenate([rest[: n_train - n_rare - n_poison], rare_train])
    train = train[rng.permutation(len(train))]

    # the responsible group: near-copies of held-out slice rows, labelled `wrong`, from one source
    x_poison = x[poison_src] + rng.normal(0, 0.05 * x.std(), size=x[poison_src].shape)
    x_train = np.concatenate([x[train], x_poison])
    true = np.concatenate([y[train], np.full(n_poison, wrong)])
    sub_train = np.concatenate([subname[train], subname[poison_src]])
    n_all = len(true)
    poison_rows = np.arange(len(train), n_all)
    source = np.array([f"batch-{i:02d}" for i in rng.integers(0, 20, n_all)], dtype=object)
    source[poison_rows] = "batch-P"

    # flipped labels among the ordinary rows
    ordinary = np.setdiff1d(np.arange(n_all), poison_rows)
    flipped = np.sort(rng.choice(ordinary, int(round(flip * len(ordinary))), replace=False))
    labels = true.copy()
    labels[flipped] = (true[flipped] + rng.integers(1, classes, len(flipped))) % classes

    # the shortcut column: 1 on half of the (observed) shortcut-class rows
    col = np.zeros(n_all)
    cand = np.flatnonzero(labels == shortcut_class)
    shortcut_rows = np.sort(rng.choice(cand, len(cand) // 2, replace=False))
    col[shortcut_rows] = 1.0
    x_train = np.column_stack([x_train, col])
    x_query = np.column_stack([x[query], np.zeros(len(query))])
    x_pool = np.column_stack([x[pool_rows], np.zeros(len(pool_rows))])
    others = np.flatnonzero(y[query] != shortcut_class)
    x_short = x_query[others].copy()
    x_short[:, -1] = 1.0

    setting = Setting(
        x_train,
        labels,
        x_query,
        y[query],
        x_pool,
        y[pool_rows],
        train_meta={"source": source.astype(str), "label": labels.astype(str), "subclass": sub_train},
        query_meta={"subclass": subname[query], "label": y[query].astype(str)},
        pool_meta={"subclass": subname[pool_rows]},
        n_classes=classes,
        wd=wd,
        name=name,
    )
    half = rng.permutation(len(query))
    rare_rows = np.flatnonzero(sub_train == rare)
    return Planted(
        setting,
        flipped,
        true,
        shortcut_rows,
        shortcut_class,
        x_short,
        y[query][others],
        poison_rows,
        "batch-P",
        slice_name,
        rare,
        rare_rows,
        np.sort(half[: len(query) // 2]),
        np.sort(half[len(query) // 2 :]),
        {"wrong_label_of_poison": wrong},
    )


def planted_digits(seed: int = 0) -> Planted:
    x, y, sub = digits_data(seed)
    return plant(x, y, sub, name="digits", seed=seed)


def planted_tabular(seed: int = 0) -> Planted:
    x, y, sub = tabular_data(seed=seed)
    return plant(x, y, sub, name="tabular", seed=seed, n_train=1000)
