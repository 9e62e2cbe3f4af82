"""Metrics that compare attribution scores with what retraining really does, or with known sources."""

from .calibrate import Calibration, calibrate
from .lds import LDSResult, lds
from .loo import LOOResult, loo
from .mislabel import MislabelResult, mislabel_detection
from .quality import frechet_distance
from .sourcing import entity_top1, mrr, recall_at_k, sourcing_auc, sourcing_report
from .suite import (
                    class_detection,
                    evaluation_suite,
                    model_randomization,
                    randomize_model,
                    shortcut_detection,
                    subclass_detection,
                    top_k_cardinality,
)

__all__ = ["Calibration", "LDSResult", "LOOResult", "calibrate", "entity_top1", "frechet_distance", "lds",
           "loo", "mrr", "recall_at_k", "sourcing_auc", "sourcing_report"]
__all__ += ["MislabelResult", "class_detection", "evaluation_suite", "mislabel_detection",
            "model_randomization", "randomize_model", "shortcut_detection", "subclass_detection",
            "top_k_cardinality"]
