"""How many denoising steps the hires pass runs: pure arithmetic, no torch.

Shared by the refine stage (hiresfix/sdxl/generate.py), which asks diffusers for that schedule, and
the progress plan (hiresfix/progress.py), which the ingress computes without importing torch.
"""

from __future__ import annotations

import math


def hires_schedule_length(
    steps: int, hires_steps: int, strength: float, max_steps: int = 1000
) -> int:
    """num_inference_steps for img2img. diffusers (like A1111) runs int(n * strength) of n steps:
    hires_steps == 0 keeps the base step count, so int(steps * strength) steps run; otherwise the
    shortest n that runs exactly hires_steps. At least one step always runs."""
    if not hires_steps and int(steps * strength) >= 1:
        return steps
    target = hires_steps or 1
    n = max(target, math.ceil(target / strength))
    while n > target and int((n - 1) * strength) >= target:  # float slack in target / strength
        n -= 1
    while int(n * strength) < target:
        n += 1
    # The schedule cannot be finer than the training schedule; at tiny strengths fewer steps run.
    return min(n, max_steps)


def hires_steps_run(steps: int, hires_steps: int, strength: float, max_steps: int = 1000) -> int:
    """Steps the hires pass really runs: diffusers runs int(n * strength) of a length-n schedule."""
    return int(hires_schedule_length(steps, hires_steps, strength, max_steps) * strength)
