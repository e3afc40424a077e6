"""Progress of /generate requests, Ray-free: the plan, the board, the CLI's status line."""

from __future__ import annotations

import pytest

from hiresfix.cli import progress_line
from hiresfix.plan import generate_plan, steps_of, upscale_plan
from hiresfix.progress import ProgressBoard
from hiresfix.schemas import GenerateRequest, UpscaleRequest


def req(**kw) -> GenerateRequest:
    return GenerateRequest(prompt="x", **kw)


def plan(r: GenerateRequest) -> dict[str, int]:
    return steps_of(generate_plan(r))


def test_plan_follows_the_step_rules():
    assert plan(req(num_inference_steps=30)) == {"base": 30}
    assert plan(req(num_inference_steps=30, hires_fix=True)) == {
        "base": 30,
        "upscale": 1,
        "hires": 15,
    }
    assert plan(req(hires_fix=True, hires_steps=150, denoising_strength=0.01))["hires"] == 10
    assert plan(req(num_inference_steps=3, hires_fix=True, denoising_strength=0.1))["hires"] == 1
    ens = plan(req(num_inference_steps=20, refiner_switch_at=0.8, use_face_restoration=True))
    assert ens == {"base": 16, "finish": 4, "face": 1}
    assert list(plan(req(refiner_switch_at=0.5, hires_fix=True, use_face_restoration=True))) == [
        "base",
        "finish",
        "upscale",
        "hires",
        "face",
    ]


def test_plan_calls_are_what_the_ingress_chains():
    r = req(
        width=64, height=64, hires_fix=True, use_face_restoration=True, face_model="f", upscaler="u"
    )
    calls = [(c.deployment, c.method, c.args) for c in generate_plan(r, "rid-1")]
    assert calls == [
        ("base", "generate", (r, "rid-1")),
        ("upscaler", "upscale", ((128, 128), "u", True)),
        ("refine", "hires", (r,)),
        ("refine", "restore_faces", (0.6, "f")),
    ]
    up = UpscaleRequest(image="x", use_realesrgan=False)
    assert [(c.stage, c.args) for c in upscale_plan(up, (30, 20))] == [
        ("upscale", ((30, 20), None, False))
    ]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_board_tracks_fraction_eta_and_end_states():
    clock = Clock()
    b = ProgressBoard(keep_s=60, clock=clock)
    assert b.begin("r1", {"base": 30, "upscale": 1, "hires": 15})
    info = b.get("r1")
    assert (info.state, info.stage, info.progress, info.eta_s) == ("running", None, 0.0, None)
    clock.t += 4.6
    b.report("r1", "base", 23)
    info = b.get("r1")
    assert (info.stage, info.step, info.stage_steps) == ("base", 23, 30)
    assert info.progress == pytest.approx(0.5) and info.eta_s == pytest.approx(4.6)
    b.report("r1", "base", 7)  # late, out-of-order report: never goes backwards
    assert b.get("r1").step == 23
    b.report("r1", "hires", 3)  # a later stage: everything before it is finished
    info = b.get("r1")
    assert info.progress == pytest.approx(34 / 46, abs=1e-4) and info.plan == {
        "base": 30,
        "upscale": 1,
        "hires": 15,
    }
    b.report("r1", "hires", 99)  # capped at the plan
    assert b.get("r1").step == 15
    assert b.get("r1").progress == 0.99, "100% only once the answer is out"
    b.report("r1", "face", 1)  # not in this request's plan: ignored
    assert b.get("r1").stage == "hires"
    assert not b.begin("r1", {"base": 1}), "an id in use by a running request is refused"
    b.end("r1", "done")
    info = b.get("r1")
    assert (info.state, info.progress, info.eta_s, info.elapsed_s) == ("done", 1.0, None, 4.6)
    b.end("r1", "failed", "too late")  # the first end wins
    assert b.get("r1").state == "done"
    assert b.begin("r1", {"base": 2}), "a finished id may be reused"
    b.end("r1", "failed", "RuntimeError: boom")
    info = b.get("r1")
    assert (info.state, info.detail) == ("failed", "RuntimeError: boom") and info.progress == 0.0


def test_board_forgets_finished_requests_and_bounds_its_size():
    clock = Clock()
    b = ProgressBoard(keep_s=60, max_entries=3, clock=clock)
    b.begin("old", {"base": 1})
    b.end("old", "done")
    b.begin("running", {"base": 1})
    clock.t += 61
    assert b.get("old") is None and b.get("running").state == "running"  # running ones never expire
    for i in range(4):
        b.begin(f"n{i}", {"base": 1})
    assert b.get("running") is None and b.get("n0") is None and b.get("n3") is not None
    assert b.get("never") is None
    b.report("never", "base", 1)  # unknown ids are ignored, not created
    assert b.get("never") is None


def test_cli_status_line():
    clock = Clock()
    b = ProgressBoard(clock=clock)
    b.begin("r", {"base": 30, "upscale": 1, "hires": 15})
    assert progress_line(b.get("r").model_dump()) == "queued |   0% | 0.0 s"
    clock.t += 12.3
    b.report("r", "hires", 6)
    assert progress_line(b.get("r").model_dump()) == "hires 6/15 |  80% | 12.3 s | ETA 3 s"
