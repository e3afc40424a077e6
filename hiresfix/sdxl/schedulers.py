"""Sampler names -> fresh diffusers schedulers, built from the model's own config
(hiresfix/samplers.py says which class and options each name means).

Each request gets a fresh scheduler: diffusers schedulers keep the timesteps, step index and solver
history on themselves, so one shared instance would mix up overlapping requests.
"""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hiresfix.samplers import sampler


def make_scheduler(name: str, config) -> SchedulerMixin:
    s = sampler(name)
    return getattr(diffusers, s.scheduler).from_config(config, **s.options)
