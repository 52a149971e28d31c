"""GNA as FlexAttention: exact mask_mods, analytic BlockMasks, and the flex path.

One module per idea; imports point one way (attention -> block_masks -> masks):

* :mod:`gna_flex.flex.masks`: the token order and the mask, :class:`MaskSpec`
  / :func:`mask_spec`, and :func:`mask_mod` with its two implementations
  (``"tables"``, ``"arith"``; :data:`MASK_IMPLS`, :data:`DEFAULT_MASK_IMPL`).
* :mod:`gna_flex.flex.block_masks`: :func:`block_mask`, the analytic
  ``BlockMask`` builder (cached), and :func:`gna_params_of`, which reads the
  marker every gna_flex mask carries.
* :mod:`gna_flex.flex.attention`: :func:`flex_na`, GNA through
  ``flex_attention`` on ``[B, *grid, heads, D]`` tensors, the layout steps
  it takes (:func:`tile_major_inputs`, :func:`tile_major_output`), and
  :func:`default_kernel_options`.

This package re-exports their public names. Module state lives in the
module that reads it: switch the default mask_mod for a run with
``gna_flex.flex.masks.DEFAULT_MASK_IMPL``.
"""

from .attention import default_kernel_options, flash_available, flex_na, tile_major_inputs, tile_major_output
from .block_masks import DEFAULT_BLOCK_SIZE, block_mask, gna_params_of
from .masks import MASK_IMPLS, MaskSpec, mask_mod, mask_spec

__all__ = [
    "MaskSpec",
    "mask_spec",
    "mask_mod",
    "block_mask",
    "gna_params_of",
    "flex_na",
    "tile_major_inputs",
    "tile_major_output",
    "default_kernel_options",
    "flash_available",
    "DEFAULT_BLOCK_SIZE",
    "MASK_IMPLS",
]
