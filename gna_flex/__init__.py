"""gna_flex: Generalized Neighborhood Attention for PyTorch.

Sliding-window, strided sliding-window and blocked attention over 1-D, 2-D
and 3-D token grids, delivered three ways:

* :func:`block_mask` / :func:`mask_mod` / :mod:`score_mods`: GNA for
  ``torch.nn.attention.flex_attention`` users;
* :func:`na1d` / :func:`na2d` / :func:`na3d`: NATTEN-compatible functions that
  run the fused Hopper kernel when it is built, else FlexAttention;
* ``torch.compile(model, backend="gna")`` with :class:`Rule`: rewrites the
  attention of existing models, when :func:`simulate` (NATTENSim) predicts
  that it pays off; :func:`explain` shows what was rewritten.
"""

from . import reference, score_mods
from .flex import block_mask, flex_na, mask_mod
from .functional import na, na1d, na2d, na3d
from .sim import estimate, recommend, simulate
from .spec import GNAParams, make_params
from .passes import Rule, explain
from .backend import gna_backend as backend

__all__ = [
    "GNAParams",
    "make_params",
    "na",
    "na1d",
    "na2d",
    "na3d",
    "block_mask",
    "mask_mod",
    "flex_na",
    "score_mods",
    "reference",
    "simulate",
    "estimate",
    "recommend",
    "Rule",
    "explain",
    "backend",
]
