"""Profile limits enforced by the ingress (no Ray cluster: the checks are plain methods)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.http import BadRequest
from deployments.ingress import Ingress, Limits
from hiresfix.schemas import GenerateRequest

check = Ingress.func_or_class._check_generate_limits


def _ingress(**limits):
    return SimpleNamespace(limits=Limits(**limits))


def test_hires_steps_obey_the_profile_step_limit():
    ing = _ingress(max_steps=50)
    req = GenerateRequest(prompt="x", width=64, height=64, hires_fix=True, hires_steps=150)
    with pytest.raises(BadRequest) as e:
        check(ing, req)
    assert e.value.field == "hires_steps" and e.value.status == 422
    check(ing, req.model_copy(update={"hires_steps": 50}))  # at the limit: fine
    check(ing, req.model_copy(update={"hires_fix": False}))  # no second pass: not checked
