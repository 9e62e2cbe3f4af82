"""TRAK with EK-FAC preconditioning in projected space: Kronecker projection × EK-FAC × TRAK's ensemble.

TRAK's random projection mixes every parameter, so its curvature must be a dense k × k matrix. A Kronecker
(LoGra) projection keeps each layer's gradient a small matrix P_gᵀ G P_a, so the Fisher in that space keeps
K-FAC's structure: its factors are P_aᵀ A P_a and P_gᵀ S P_g, and EK-FAC's eigenvalue correction is fitted to
the projected per-example gradients. Scores use TRAK's out-to-loss weights and ensemble mean over models.
This file is the whole method: a composition of existing parts.
"""

from __future__ import annotations

from . import register
from .gradient import GradientMethod

register("trak-ekfac", GradientMethod, features="kronecker", curvature="ekfac", combination="ensemble")
