"""Metrics that compare attribution scores with what retraining really does, or with known sources."""

from .calibrate import Calibration, calibrate
from .lds import LDSResult, lds
from .loo import LOOResult, loo
from .sourcing import entity_top1, mrr, recall_at_k, sourcing_auc, sourcing_report

__all__ = ["Calibration", "LDSResult", "LOOResult", "calibrate", "entity_top1", "lds", "loo", "mrr",
           "recall_at_k", "sourcing_auc", "sourcing_report"]
