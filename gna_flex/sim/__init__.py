"""NATTENSim for gna_flex: tile-visit simulation, cost model and config recommender.

- :func:`simulate` counts what a tiled kernel visits (analytically, per axis).
- :func:`estimate` predicts GNA and dense attention times from a report.
- :func:`recommend` ranks nearby configs by predicted speedup.

The CLI is ``gna-sim`` (or ``python -m gna_flex.sim``).
"""

from .cost import Estimate, device_family, estimate, load_calibration, path_simulate_kwargs
from .recommend import Recommendation, recommend
from .report import DEFAULT_TILES, SimReport, simulate

__all__ = [
    "DEFAULT_TILES",
    "Estimate",
    "Recommendation",
    "SimReport",
    "device_family",
    "estimate",
    "load_calibration",
    "path_simulate_kwargs",
    "recommend",
    "simulate",
]
