"""Influence functions: `score(q, i) = -∇m(q)ᵀ (C + λI)⁻¹ ∇L(i)` with C a curvature of the mean training loss.

`method="influence"` takes any `curvature=` from `sourcetrace.curvature` (default EK-FAC, which works at
every scale); `method="ekfac"` (and "explicit", "cg", "lissa", "arnoldi", "kfac", "diagonal", "datainf") is
influence with that curvature fixed.
"""

from __future__ import annotations

from . import register
from .gradient import GradientMethod

CURVATURE_METHODS = ("explicit", "cg", "lissa", "arnoldi", "kfac", "ekfac", "diagonal", "datainf")

register("influence", GradientMethod, curvature="ekfac")
for _name in CURVATURE_METHODS:
    register(_name, GradientMethod, fixed=("curvature",), curvature=_name)
