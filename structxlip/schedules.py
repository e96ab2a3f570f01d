"""Loss-weight and learning-rate schedules (METHOD.md section 4); pure functions of the step or epoch."""

from __future__ import annotations

import math

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"


def warm_cosine_weight(base: float, epoch: float, warm: float, decay_start: float, decay_end: float,
                       floor: float) -> float:
    """Return ``base`` times the warm-up / plateau / cosine-decay factor for ``epoch`` (0-based, may be fractional).

    factor = (e+1)/warm while e < warm; 1 until decay_start; then
    floor + (1-floor) * (1 + cos(pi * p / (decay_end - decay_start))) / 2 with p = clamp(e - decay_start, 0, span).
    A zero-length decay (decay_end == decay_start) jumps straight to ``floor`` at decay_start.
    """
    if epoch < warm:
        return base * (epoch + 1) / warm
    if epoch < decay_start:
        return base
    span = decay_end - decay_start
    if span <= 0:
        return base * floor
    progress = min(max(epoch - decay_start, 0.0), span)
    return base * (floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress / span)) / 2.0)


def cosine_lr(step: int, total_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Return the learning rate at optimiser ``step`` (0-based) of a cosine decay from base_lr to min_lr."""
    if total_steps <= 0:
        return base_lr
    progress = min(max(step / total_steps, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
