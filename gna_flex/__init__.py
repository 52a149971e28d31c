"""gna_flex: Generalized Neighborhood Attention for PyTorch."""

from .spec import GNAParams, make_params

__all__ = ["GNAParams", "make_params"]
