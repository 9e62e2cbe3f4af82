"""Per-example gradient capture and the on-disk gradient store."""

from .capture import GradientCapture, select_parameters

__all__ = ["GradientCapture", "select_parameters"]
