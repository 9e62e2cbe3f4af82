"""Insights on Scores for people who curate data: groups, behaviours, actions with their simulated and
verified effects, data debugging, reliability signals and undersampled regions.

- `group_mass`, `group_removal`, `feature_clusters`: score mass per group and the group counterfactual.
- `Behaviour`, `responsible_groups`: the training groups behind a behaviour of several queries.
- `Action`, `pool_scores`, `whatif`: remove / relabel / reweight / acquire, predicted and (verify) retrained.
- `suspicion`, `heldout_harm`, `outliers`: mislabel and outlier signals.
- `reliability`: agreement across methods, checkpoints, seeds; bootstrap stability; unstable flags.
- `support`, `flag`, `regions`: thinly supported queries, clustered and described.
- `Setting`: a small saved tabular setting in which every claim can be checked by retraining.
"""

from .actions import Action, Effect, Pool, WeightedTask, apply, pool_scores, predict_margins, whatif
from .behaviour import Behaviour, GroupRanking, responsible_groups
from .debugging import heldout_harm, outliers, percentile_ranks, suspicion
from .groups import feature_clusters, group_mass, group_removal, members
from .reliability import Reliability, reliability, topk_jaccard, topk_rank_correlation
from .setting import Setting, margins_from_logits
from .undersampled import Region, Support, flag, regions, support

__all__ = [
    "Action",
    "Behaviour",
    "Effect",
    "GroupRanking",
    "Pool",
    "Region",
    "Reliability",
    "Setting",
    "Support",
    "WeightedTask",
    "apply",
    "feature_clusters",
    "flag",
    "group_mass",
    "group_removal",
    "heldout_harm",
    "margins_from_logits",
    "members",
    "outliers",
    "percentile_ranks",
    "pool_scores",
    "predict_margins",
    "regions",
    "reliability",
    "responsible_groups",
    "support",
    "suspicion",
    "topk_jaccard",
    "topk_rank_correlation",
    "whatif",
]
