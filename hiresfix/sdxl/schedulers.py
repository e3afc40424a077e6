"""Sampler names (schemas.SCHEDULERS) -> diffusers schedulers, built from the model's own config.

Each request gets a fresh scheduler: diffusers schedulers keep the timesteps, step index and solver
history on themselves, so one shared instance would mix up overlapping requests.
"""

from __future__ import annotations

from typing import Callable

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# A1111 names; karras sigmas are set explicitly both ways, so that a model shipping a karras config
# still gets plain "euler" / "dpmpp_2m" when asked.
SCHEDULER_FACTORIES: dict[str, Callable[[dict], SchedulerMixin]] = {
    "euler": lambda config: EulerDiscreteScheduler.from_config(config, use_karras_sigmas=False),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "dpmpp_2m": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False
    ),
    "dpmpp_2m_karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    ),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config),
}


def make_scheduler(name: str, config) -> SchedulerMixin:
    try:
        factory = SCHEDULER_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULER_FACTORIES)}") from None
    return factory(config)
