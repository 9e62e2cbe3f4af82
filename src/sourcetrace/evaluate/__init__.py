"""Metrics that compare attribution scores with what retraining really does."""

from .lds import LDSResult, lds
from .loo import LOOResult, loo

__all__ = ["LDSResult", "LOOResult", "lds", "loo"]
