"""Compatible SDXL requests share one diffusers call (BaseStage.run_batch, RefineStage.hires_batch).

Tiny random SDXL, 64 px, 2-4 steps. A job batched with others gives what it gives alone, up to the
last 8-bit step (batched CPU matmuls round differently; the one-job batch IS run, bit for bit);
each job's on_step sees its own rows, and cancelling or stopping one job leaves the others alone.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.cancel import run_batched
from hiresfix.sdxl.batching import base_key, group, hires_key, run_groups
from tests.sdxl_fixtures import assert_valid, make_req, pixels, same, upscaled

# Batched vs alone on this CPU: pictures within 2/255 (2 steps of 8 bits), latents within 1e-4.
PIXEL_TOL = 2 / 255
LATENT_TOL = 1e-4


class Cancelled(Exception):
    """Stands in for deployments.cancel.RequestCancelled."""


def close(a, b) -> bool:
    return np.abs(pixels(a) - pixels(b)).max() <= PIXEL_TOL


def recorder(stop_at: int | None = None, raise_at: int | None = None):
    """An on_step that records (step, latents shape); stops early or raises at a given step."""
    calls = []

    def on_step(step, _timestep, latents):
        calls.append((step, tuple(latents.shape)))
        if step == raise_at:
            raise Cancelled(f"cancelled at step {step}")
        return step == stop_at

    return on_step, calls


@pytest.fixture
def unet_calls(base_stage):
    """How many UNet forwards ran (the shared modules of base_stage and refine_stage)."""
    calls = []
    handle = base_stage.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


# --- keys ---------------------------------------------------------------------------------------


def test_base_key_ignores_what_each_row_carries():
    a = make_req()
    b = make_req(prompt="a castle", negative_prompt="blurry", seed=9, num_images=3, hires_fix=True)
    assert base_key(a) == base_key(b)


@pytest.mark.parametrize(
    "change",
    [
        dict(width=96),
        dict(height=96),
        dict(num_inference_steps=5),
        dict(guidance_scale=4.0),
        dict(guidance_scale=1.0),  # CFG off: no negative rows
        dict(scheduler="euler_a"),
        dict(refiner_switch_at=0.7),
    ],
)
def test_base_key_separates_what_the_call_takes(change):
    assert base_key(make_req()) != base_key(make_req(**change))


def pics(*sizes):
    return SimpleNamespace(pictures=[SimpleNamespace(size=s) for s in sizes])


def test_hires_key_uses_the_effective_second_pass_settings():
    up = pics((128, 128), (128, 128))
    a = make_req(num_inference_steps=4, hires_steps=2, denoising_strength=0.5)
    # Other base steps, the same hires schedule; the first pass's cfg/scheduler overridden alike.
    b = make_req(
        prompt="a castle",
        hires_prompt="a red car",
        seed=5,
        num_inference_steps=10,
        hires_steps=2,
        denoising_strength=0.5,
        guidance_scale=9.0,
        hires_guidance_scale=a.guidance_scale,
        scheduler="ddim",
        hires_scheduler=a.scheduler,
    )
    assert hires_key(up, a) == hires_key(pics((128, 128)), b)
    # hires_steps 0 keeps the base step count: a schedule of 10 at strength 0.5 runs 5 steps, as
    # hires_steps 5 does from 4 base steps.
    ten = make_req(num_inference_steps=10, hires_steps=0, denoising_strength=0.5)
    assert hires_key(up, ten) == hires_key(
        up, ten.model_copy(update=dict(num_inference_steps=4, hires_steps=5))
    )


@pytest.mark.parametrize(
    "pictures, change",
    [
        (pics((96, 128)), {}),
        (None, dict(denoising_strength=0.6)),
        (None, dict(hires_steps=3)),
        (None, dict(hires_guidance_scale=2.0)),
        (None, dict(guidance_scale=2.0)),
        (None, dict(hires_scheduler="euler_a")),
        (None, dict(scheduler="euler_a")),
    ],
)
def test_hires_key_separates_what_the_call_takes(pictures, change):
    up = pics((128, 128))
    req = make_req(hires_steps=2, denoising_strength=0.5)
    assert hires_key(up, req) != hires_key(pictures or up, req.model_copy(update=change))


def test_group_keeps_order_of_first_appearance():
    assert group(["b", "a", "b", "c", "a"], key=str) == [[0, 2], [1, 4], [3]]
    assert group([], key=str) == []


# --- base pass ----------------------------------------------------------------------------------

REQ_A = dict(num_inference_steps=3, seed=10, num_images=2)
REQ_B = dict(num_inference_steps=3, seed=77, prompt="a castle", negative_prompt="blurry")


def test_run_batch_matches_each_request_alone(base_stage):
    a, b = make_req(**REQ_A), make_req(**REQ_B)
    out_a, out_b = base_stage.run_batch([(a, None), (b, None)])
    assert_valid(out_a, 2, (64, 64))
    assert_valid(out_b, 1, (64, 64))
    assert out_a.seeds == [10, 11] and out_b.seeds == [77]
    assert close(out_a, base_stage.run(a)) and close(out_b, base_stage.run(b))
    assert out_a.shared == out_b.shared == {"base": (2, 3)}
    assert out_a.timings["base"] == out_b.timings["base"] > 0  # the shared call's wall time


def test_one_job_batch_is_run_bit_for_bit(base_stage):
    req = make_req(**REQ_A)
    (batched,) = base_stage.run_batch([(req, None)])
    alone = base_stage.run(req)
    assert same(batched, alone) and batched.seeds == alone.seeds
    assert alone.shared == {"base": (1, 2)}


def test_run_batch_ensemble_splits_latents(base_stage):
    a = make_req(**REQ_A, refiner_switch_at=0.6)
    b = make_req(**REQ_B, refiner_switch_at=0.6)
    on_a, seen_a = recorder()
    out_a, out_b = base_stage.run_batch([(a, on_a), (b, None)])
    assert out_a.pictures == [] and out_a.latents.shape == (2, 4, 8, 8)
    assert out_b.latents.shape == (1, 4, 8, 8)
    # Each job's own tensor, not a view of the call's: it is pickled to the refine replica alone.
    assert out_b.latents.untyped_storage().nbytes() == out_b.latents.nbytes
    assert {shape for _, shape in seen_a} == {(2, 4, 8, 8)}  # its on_step saw its rows only
    for out, req in [(out_a, a), (out_b, b)]:
        alone = base_stage.run(req).latents
        assert (out.latents - alone).abs().max() <= LATENT_TOL


def test_incompatible_jobs_are_refused_naming_the_field(base_stage):
    with pytest.raises(ValueError, match="guidance_scale 7.0 != 3.0"):
        base_stage.run_batch([(make_req(), None), (make_req(guidance_scale=3.0), None)])


# --- step callbacks of a shared call ------------------------------------------------------------


def test_each_member_sees_its_own_rows(base_stage):
    on_a, seen_a = recorder()
    on_b, seen_b = recorder()
    base_stage.run_batch([(make_req(**REQ_A), on_a), (make_req(**REQ_B), on_b)])
    assert seen_a == [(i, (2, 4, 8, 8)) for i in range(3)]
    assert seen_b == [(i, (1, 4, 8, 8)) for i in range(3)]


def test_cancelled_member_gets_its_exception_the_other_its_picture(base_stage):
    a, b = make_req(**REQ_A), make_req(**REQ_B)
    plain_a, plain_b = base_stage.run_batch([(a, None), (b, None)])
    on_a, seen_a = recorder(raise_at=1)
    on_b, seen_b = recorder()
    out_a, out_b = base_stage.run_batch([(a, on_a), (b, on_b)])
    assert isinstance(out_a, Cancelled) and str(out_a) == "cancelled at step 1"
    assert [s for s, _ in seen_a] == [0, 1]  # no callbacks after it raised
    assert [s for s, _ in seen_b] == [0, 1, 2]
    assert same(out_b, plain_b)  # the call went on unchanged


def test_early_stop_of_one_member_does_not_stop_the_other(base_stage, unet_calls):
    a, b = make_req(**REQ_A), make_req(**REQ_B)
    plain_a, _ = base_stage.run_batch([(a, None), (b, None)])
    unet_calls.clear()
    on_a, seen_a = recorder(stop_at=0)
    on_b, seen_b = recorder()
    out_a, out_b = base_stage.run_batch([(a, on_a), (b, on_b)])
    assert [s for s, _ in seen_a] == [0] and [s for s, _ in seen_b] == [0, 1, 2]
    assert len(unet_calls) == 3
    assert same(out_a, plain_a)  # a shared call's final picture, not the one of step 0


def test_every_member_stopping_ends_the_call_early(base_stage, unet_calls):
    a, b = make_req(**REQ_A), make_req(**REQ_B)
    plain_a, _ = base_stage.run_batch([(a, None), (b, None)])
    unet_calls.clear()
    on_a, _ = recorder(stop_at=0)
    on_b, seen_b = recorder(stop_at=1)
    out_a, out_b = base_stage.run_batch([(a, on_a), (b, on_b)])
    assert [s for s, _ in seen_b] == [0, 1]
    assert len(unet_calls) == 2  # of 3 steps
    assert_valid(out_a, 2, (64, 64))
    assert not same(out_a, plain_a)


def test_every_member_cancelled_abandons_the_call(base_stage, unet_calls):
    on_a, _ = recorder(raise_at=0)
    on_b, _ = recorder(raise_at=0)
    out_a, out_b = base_stage.run_batch([(make_req(**REQ_A), on_a), (make_req(**REQ_B), on_b)])
    assert isinstance(out_a, Cancelled) and isinstance(out_b, Cancelled)
    assert len(unet_calls) == 1


def test_run_raises_its_callbacks_exception(base_stage):
    boom = Cancelled("gone")

    def on_step(*_):
        raise boom

    with pytest.raises(Cancelled) as info:
        base_stage.run(make_req(num_inference_steps=2), on_step=on_step)
    assert info.value is boom


# --- hires pass ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ups(base_stage):
    a, b = make_req(**REQ_A, hires_fix=True), make_req(**REQ_B, hires_fix=True)
    return [
        (upscaled(base_stage.run(r), (96, 96)), r.model_copy(update={"hires_steps": 2}))
        for r in (a, b)
    ]


def test_hires_batch_matches_each_request_alone(refine_stage, ups):
    (up_a, a), (up_b, b) = ups
    before = pixels(up_a).copy()
    out_a, out_b = refine_stage.hires_batch([(up_a, a, None), (up_b, b, None)])
    assert_valid(out_a, 2, (96, 96))
    assert_valid(out_b, 1, (96, 96))
    assert out_a.seeds == up_a.seeds and out_b.seeds == up_b.seeds
    assert np.array_equal(pixels(up_a), before), "the input batch must not be modified"
    assert close(out_a, refine_stage.hires(up_a, a)) and close(out_b, refine_stage.hires(up_b, b))
    assert out_a.shared == {"base": (1, 2), "refine": (2, 3)}
    assert out_a.timings["base"] == up_a.timings["base"] and out_a.timings["refine"] > 0


def test_one_job_hires_batch_is_hires_bit_for_bit(refine_stage, ups):
    (up_a, a), _ = ups
    (batched,) = refine_stage.hires_batch([(up_a, a, None)])
    assert same(batched, refine_stage.hires(up_a, a))


def test_hires_batch_callbacks_are_per_member(refine_stage, ups):
    (up_a, a), (up_b, b) = ups
    _, plain_b = refine_stage.hires_batch([(up_a, a, None), (up_b, b, None)])
    on_a, seen_a = recorder(raise_at=0)
    on_b, seen_b = recorder()
    out_a, out_b = refine_stage.hires_batch([(up_a, a, on_a), (up_b, b, on_b)])
    assert isinstance(out_a, Cancelled)
    assert seen_b == [(0, (1, 4, 12, 12)), (1, (1, 4, 12, 12))]
    assert same(out_b, plain_b)


def test_hires_batch_refuses_incompatible_jobs(refine_stage, ups):
    (up_a, a), (up_b, b) = ups
    b = b.model_copy(update={"denoising_strength": 0.7})
    with pytest.raises(ValueError, match="denoising_strength"):
        refine_stage.hires_batch([(up_a, a, None), (up_b, b, None)])


# --- a @serve.batch's jobs (hiresfix.sdxl.batching.run_groups, deployments/cancel.run_batched) ---


def test_run_groups_shares_calls_between_compatible_jobs_only(base_stage):
    a, b = make_req(**REQ_A), make_req(**REQ_B)
    c = make_req(**{**REQ_B, "num_inference_steps": 2})  # another schedule: a call of its own
    outcomes = asyncio.run(
        run_groups([(a, None), (c, None), (b, None)], base_stage.batch_key, base_stage.run_batch)
    )
    assert [o.shared["base"][0] for o in outcomes] == [2, 1, 2]
    for req, outcome in zip((a, c, b), outcomes):
        assert close(outcome, base_stage.run(req))


def test_run_groups_gives_a_groups_error_to_its_jobs_only(base_stage):
    def run_batch(jobs):
        if jobs[0][0].num_inference_steps == 2:
            raise MemoryError("out of memory")
        return base_stage.run_batch(jobs)

    a, c = make_req(**REQ_A), make_req(**{**REQ_B, "num_inference_steps": 2})
    out_a, out_c = asyncio.run(run_groups([(a, None), (c, None)], base_stage.batch_key, run_batch))
    assert isinstance(out_c, MemoryError) and not isinstance(out_a, Exception)


def test_a_cancelled_request_leaves_the_shared_call_and_the_other_gets_its_pictures(base_stage):
    """Two requests in one shared call (as @serve.batch hands them over); the client of the first
    goes away during the denoising: its on_step raises at the next step, only it is dropped, and
    its slot is held until the shared call ends."""
    a = make_req(**{**REQ_A, "num_inference_steps": 12})
    b = make_req(**{**REQ_B, "num_inference_steps": 12})
    steps_a: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        queued: list = []
        ended: list[bool] = []

        async def submit(job):  # stands in for @serve.batch: the second job starts the call
            future = loop.create_future()
            queued.append((job, future))
            if len(queued) == 2:
                jobs = [j for j, _ in queued]
                outcomes = await run_groups(jobs, base_stage.batch_key, base_stage.run_batch)
                ended.append(True)
                for (_, f), outcome in zip(queued, outcomes):
                    f.set_result(outcome)
            return await future

        first = asyncio.ensure_future(
            run_batched(lambda on_step: submit((a, on_step)), "a", lambda n, _: steps_a.append(n))
        )
        second = asyncio.ensure_future(run_batched(lambda on_step: submit((b, on_step)), "b"))
        while len(steps_a) < 2:
            await asyncio.sleep(0.005)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert ended  # the slot was held until the shared call ended
        return await second

    out_b = asyncio.run(main())
    assert 2 <= len(steps_a) < 12  # dropped at the step after the cancel
    assert close(out_b, base_stage.run(b))
