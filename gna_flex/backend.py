"""The ``"gna"`` torch.compile backend: run the gna pass, then hand the graph on.

Use::

    compiled = torch.compile(model, backend="gna", options={
        "rules": [gna_flex.Rule(grid=(T, H, W), kernel_size=(18, 24, 24), stride=(16, 8, 8),
                                extra_tokens=256, module=r"blocks\\.\\d+\\.attn")],
        "inner": "inductor",          # or "aot_eager" / "eager"
    })
    gna_flex.explain(compiled).print()   # after the first call

The name ``"gna"`` reaches torch through the ``torch_dynamo_backends`` entry
point of the package (torch loads this module and registers
:func:`gna_backend` itself; registering here too would be a duplicate name).
The function is also usable directly: ``torch.compile(model, backend=gna_flex.backend.gna_backend)``.

Options (``options=`` of ``torch.compile``):

* ``"rules"``: a list (or tuple) of :class:`gna_flex.passes.Rule`; default none.
  SDPA calls are rewritten only under a rule; flex_attention calls whose
  block mask came from ``gna_flex.block_mask`` need no rule.
* ``"inner"``: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"``: the
  compiler that receives the rewritten graph. ``mode=`` of ``torch.compile``
  is passed to Inductor.

Options are checked when the backend first runs (the first call of the
compiled model); errors name the option. torch reports backend errors as
``torch._dynamo.exc.BackendCompilerFailed`` carrying our ``ValueError`` /
``TypeError`` as ``inner_exception``; :func:`check_options` raises them
directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from gna_flex.passes import Rule, gna_pass
from gna_flex.passes.explain import current_owner, record

__all__ = ["gna_backend", "check_options", "BackendOptions", "INNER_COMPILERS", "OPTION_KEYS"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
OPTION_KEYS = ("rules", "inner")


@dataclass(frozen=True)
class BackendOptions:
    rules: tuple[Rule, ...] = ()
    inner: str = "inductor"


def check_options(options: Optional[Mapping[str, Any]]) -> BackendOptions:
    """Validate the ``options`` dict of ``torch.compile(..., backend="gna")``.

    Raises:
        TypeError: options is not a mapping, rules is not a list/tuple of
            Rule, inner is not a string.
        ValueError: an unknown key, an unknown inner compiler, or an
            impossible rule; the message names the option.
    """
    if options is None:
        return BackendOptions()
    if not isinstance(options, Mapping):
        raise TypeError(f"gna backend: options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in OPTION_KEYS)
    if unknown:
        raise ValueError(f"gna backend: unknown option key(s) {unknown}; known keys: {list(OPTION_KEYS)}")
    rules = options.get("rules", ())
    if isinstance(rules, Rule):
        raise TypeError("gna backend: options['rules'] must be a list of gna_flex.Rule, got a single Rule; "
                        "wrap it in a list")
    if not isinstance(rules, (list, tuple)):
        raise TypeError(f"gna backend: options['rules'] must be a list of gna_flex.Rule, got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            raise TypeError(f"gna backend: options['rules'][{i}] must be a gna_flex.Rule, got {type(rule).__name__}")
        try:
            # Re-validate: a Rule may have been altered after construction (object.__setattr__).
            Rule.__post_init__(rule)
        except (TypeError, ValueError) as e:
            raise type(e)(f"gna backend: options['rules'][{i}]: {e}") from None
    inner = options.get("inner", "inductor")
    if not isinstance(inner, str):
        raise TypeError(f"gna backend: options['inner'] must be a string, got {type(inner).__name__}")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"gna backend: options['inner'] must be one of {INNER_COMPILERS}, got {inner!r}")
    return BackendOptions(tuple(rules), inner)


def _inner_compiler(inner: str, mode: Optional[str]) -> Callable:
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else None

        def run_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]):
            return compile_fx(gm, list(example_inputs), config_patches=patches)

        return run_inductor
    if mode and mode != "default":
        raise ValueError(f"gna backend: mode={mode!r} applies to Inductor only, but options['inner'] is {inner!r}")
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")
    return lambda gm, example_inputs: gm.forward


def gna_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Optional[Mapping[str, Any]] = None,
    mode: Optional[str] = None,
) -> Callable:
    """torch.compile backend: rewrite attention to GNA where it pays off, then compile with the inner compiler.

    Args:
        gm: the Dynamo FX graph (before AOT autograd).
        example_inputs: its inputs (real tensors; block masks are recognised through them).
        options: see the module docstring.
        mode: torch.compile's ``mode``, forwarded to Inductor.
    """
    opts = check_options(options)
    inner = _inner_compiler(opts.inner, mode)
    rows = gna_pass(gm, example_inputs, opts.rules)
    record(current_owner(), rows)
    return inner(gm, example_inputs)
