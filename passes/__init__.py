"""FX graph passes of gna_flex (installed as ``gna_flex.passes``).

The ``gna`` torch.compile backend (:mod:`gna_flex.backend`) runs
:func:`gna_pass` on the Dynamo graph: it finds attention calls
(:mod:`.match`), decides with the simulator whether GNA pays off
(:mod:`.decide`), rewrites them to the gna_flex op (:mod:`.rewrite`; for
tile-major flex masks it first tries to fold the caller's permutation chains,
:mod:`.fold`; calls whose ``attn_mask`` pads extra tokens are read at run
time by :mod:`.key_padding`, under rules with ``extra_key_mask``) and
records what it did for :func:`explain` (:mod:`.explain`).
"""

from .explain import ExplainRow, Explanation, explain
from .pipeline import gna_pass
from .rule import Rule

__all__ = ["Rule", "gna_pass", "explain", "Explanation", "ExplainRow"]
