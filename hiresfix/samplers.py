"""The samplers hiresfix serves: one table, read by the request schema (allowed names), the
diffusers scheduler factory (hiresfix/sdxl/schedulers.py) and the A1111 mapping (hiresfix/a1111.py).

Adding a sampler is one row here. Like diffusers' `_compatibles`, a row names the scheduler class
and the config overrides that make it this sampler; the class is built from the model's own config.
No torch or diffusers import: the schema and the ingress read this table too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Sampler:
    name: str  # what /generate's `scheduler` takes
    a1111: str  # AUTOMATIC1111's display name (its `sampler_name`)
    scheduler: str  # diffusers scheduler class
    # Karras sigmas are set explicitly both ways, so a model whose config ships karras still gets
    # plain "euler" / "dpmpp_2m" when asked.
    options: dict[str, Any] = field(default_factory=dict)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("euler", "Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler(
        "dpmpp_2m",
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, "use_karras_sigmas": False},
    ),
    Sampler(
        "dpmpp_2m_karras",
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, "use_karras_sigmas": True},
    ),
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
)

SAMPLER_NAMES: tuple[str, ...] = tuple(s.name for s in SAMPLERS)
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # built from the table
BY_NAME: dict[str, Sampler] = {s.name: s for s in SAMPLERS}


def sampler(name: str) -> Sampler:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SAMPLER_NAMES)}") from None
