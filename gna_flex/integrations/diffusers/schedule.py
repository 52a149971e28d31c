"""Dense first steps: which denoising steps use dense attention.

The GNA paper keeps the first denoising steps dense (they set the global
layout) and runs the rest with GNA. :class:`DenseSteps` holds the policy and
the current step; the step is advanced by one of two trackers:

* :class:`SchedulerTracker` (a pipeline was given): wraps the pipeline
  scheduler's ``set_timesteps`` (resets the step, learns the number of steps)
  and ``step`` (advances it after each denoising step). Nothing runs inside
  the transformer, so classifier-free guidance with two forwards per step is
  counted once.
* the timestep rule (a bare transformer was given): the transformer's forward
  pre-hook reports each call's timestep to :meth:`DenseSteps.observe_timestep`.
  Timesteps fall during sampling, so a lower timestep is the next step, an
  equal one is the same step (a second guidance pass), and a higher one
  starts a new generation.

The mode is a plain Python attribute read by the attention processors; under
``torch.compile`` it becomes a guard, so switching modes compiles at most one
graph per mode, once.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

__all__ = ["DenseSteps", "SchedulerTracker"]

DenseStepsArg = Union[int, float]


class DenseSteps:
    """Dense-first-steps policy and step counter.

    Args:
        dense_steps: an ``int >= 0``: that many first steps are dense; a
            ``float`` in ``[0, 1]``: that fraction of the steps, rounded up
            (needs the number of steps: from the pipeline's scheduler, or
            ``num_inference_steps``).
        num_inference_steps: number of steps when no scheduler tells it.
    """

    def __init__(self, dense_steps: DenseStepsArg = 0, num_inference_steps: Optional[int] = None) -> None:
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, numbers.Real):
            raise TypeError(f"dense_steps must be an int (steps) or a float in [0, 1] (fraction), got {dense_steps!r}")
        if isinstance(dense_steps, numbers.Integral):
            if dense_steps < 0:
                raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
        elif not 0.0 <= float(dense_steps) <= 1.0:
            raise ValueError(f"dense_steps as a fraction must be in [0, 1], got {dense_steps}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int or None, got {num_inference_steps!r}")
        self.dense_steps = dense_steps
        self.num_inference_steps = num_inference_steps
        self.step = 0
        self.override: Optional[str] = None
        self._last_timestep: Optional[float] = None

    def num_dense(self) -> int:
        """Number of leading dense steps under the current number of steps."""
        if isinstance(self.dense_steps, numbers.Integral):
            return int(self.dense_steps)
        if self.num_inference_steps is None:
            raise ValueError(
                "dense_steps is a fraction but the number of steps is unknown: pass the pipeline to enable() "
                "(its scheduler tells it) or pass num_inference_steps"
            )
        return math.ceil(float(self.dense_steps) * self.num_inference_steps - 1e-9)

    @property
    def dense(self) -> bool:
        """Whether the current step runs dense attention."""
        if self.override is not None:
            return self.override == "dense"
        return self.step < self.num_dense()

    def set_override(self, mode: Optional[str]) -> None:
        """Force ``"dense"`` or ``"gna"`` for every step (benchmarks, debugging); None follows the schedule."""
        if mode not in (None, "dense", "gna"):
            raise ValueError(f"mode must be None, 'dense' or 'gna', got {mode!r}")
        self.override = mode

    def reset(self, num_inference_steps: Optional[int] = None) -> None:
        """Start a new generation (step 0); optionally learn its number of steps."""
        self.step = 0
        self._last_timestep = None
        if num_inference_steps is not None:
            self.num_inference_steps = num_inference_steps

    def advance(self) -> None:
        self.step += 1

    def observe_timestep(self, t: Optional[float]) -> None:
        """Timestep rule for a bare transformer (see the module docstring)."""
        if t is None:
            return
        last = self._last_timestep
        if last is None or t > last:
            self.step = 0
        elif t < last:
            self.step += 1
        self._last_timestep = t


class SchedulerTracker:
    """Counts a pipeline's denoising steps through its scheduler (see module docstring)."""

    _METHODS = ("set_timesteps", "step")

    def __init__(self, scheduler: Any, schedule: DenseSteps) -> None:
        for name in self._METHODS:
            if not callable(getattr(scheduler, name, None)):
                raise TypeError(f"pipeline scheduler {type(scheduler).__name__} has no {name}() to follow the steps")
        self.scheduler = scheduler
        self.schedule = schedule
        self._saved = {name: scheduler.__dict__.get(name) for name in self._METHODS}
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        def tracked_set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            schedule.reset(len(timesteps) if timesteps is not None else None)
            return out

        def tracked_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            schedule.advance()
            return out

        scheduler.set_timesteps = tracked_set_timesteps
        scheduler.step = tracked_step

    def remove(self) -> None:
        """Restore the scheduler's own methods."""
        for name, saved in self._saved.items():
            if saved is None:
                self.scheduler.__dict__.pop(name, None)
            else:
                setattr(self.scheduler, name, saved)
