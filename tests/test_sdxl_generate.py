"""Every request parameter of the SDXL stages changes the result the way it should.

Tiny random SDXL, 64 px base images, a few steps: pictures are noise-like, so "changes the image"
means "not bit-identical", and "the same" means bit-identical.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import diffusers
import numpy as np
import pytest
import torch

from hiresfix.samplers import SAMPLER_NAMES, sampler
from hiresfix.schemas import SEED_MAX
from hiresfix.sdxl import hires_schedule_length, make_scheduler
from tests.sdxl_fixtures import assert_valid, make_req, pixels, same, upscaled


def count_steps(stage_call, *args, **kw):
    steps = []
    out = stage_call(*args, on_step=lambda i, t, *_: steps.append(int(t)), **kw)
    return out, steps


# --- base pass ----------------------------------------------------------------------------------


def test_step_callback_gets_the_timestep_unconverted(base_stage):
    # On a GPU the scheduler's timestep is a device tensor: converting it (int) at every step
    # would wait for the GPU, so the model code hands it on as it is.
    seen = []
    base_stage.run(make_req(num_inference_steps=2), on_step=lambda i, t, *_: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1]
    assert all(isinstance(t, torch.Tensor) for _, t in seen)


def test_same_seed_same_image_bit_for_bit(base_stage):
    a, b = base_stage.run(make_req()), base_stage.run(make_req())
    assert_valid(a, 1, (64, 64))
    assert a.seeds == [1234] and same(a, b)
    assert a.pictures[0].rgb_u8().tobytes() == b.pictures[0].rgb_u8().tobytes()
    assert "base" in a.timings and a.timings["base"] > 0


def test_seed_changes_image(base_stage):
    assert not same(base_stage.run(make_req(seed=1)), base_stage.run(make_req(seed=2)))


def test_random_seed_is_returned_and_reproduces(base_stage):
    a = base_stage.run(make_req(seed=None))
    (seed,) = a.seeds
    assert 0 <= seed <= SEED_MAX
    assert same(a, base_stage.run(make_req(seed=seed)))
    assert base_stage.run(make_req(seed=None)).seeds != a.seeds  # 1 in 2**32 flake chance


def test_num_images_gives_distinct_images_with_consecutive_seeds(base_stage):
    batch = base_stage.run(make_req(seed=500, num_images=3))
    assert_valid(batch, 3, (64, 64))
    assert batch.seeds == [500, 501, 502]
    px = pixels(batch)
    assert not np.array_equal(px[0], px[1]) and not np.array_equal(px[1], px[2])
    # Image i is image "seed + i" made alone (batched matmuls may differ in the last 8-bit step).
    for i, seed in enumerate(batch.seeds):
        alone = pixels(base_stage.run(make_req(seed=seed)))[0]
        assert np.abs(px[i] - alone).max() <= 2 / 255


def test_seeds_wrap_around_at_2_to_the_32(base_stage):
    assert base_stage.run(make_req(seed=SEED_MAX, num_images=2)).seeds == [SEED_MAX, 0]


def test_prompt_changes_image(base_stage):
    assert not same(
        base_stage.run(make_req()), base_stage.run(make_req(prompt="a castle at night"))
    )


def test_negative_prompt_changes_image(base_stage):
    plain = base_stage.run(make_req())
    neg = base_stage.run(make_req(negative_prompt="blurry, ugly"))
    assert not same(plain, neg)
    assert same(neg, base_stage.run(make_req(negative_prompt="blurry, ugly")))


def test_steps_change_image_and_step_count(base_stage):
    a, steps_a = count_steps(base_stage.run, make_req(num_inference_steps=3))
    b, steps_b = count_steps(base_stage.run, make_req(num_inference_steps=6))
    assert len(steps_a) == 3 and len(steps_b) == 6
    assert not same(a, b)


def test_guidance_scale_changes_image(base_stage):
    a = base_stage.run(make_req(guidance_scale=1.0))  # 1.0: no classifier-free guidance at all
    b = base_stage.run(make_req(guidance_scale=4.0))
    c = base_stage.run(make_req(guidance_scale=9.0))
    assert not same(a, b) and not same(b, c)


def test_width_and_height(base_stage):
    batch = base_stage.run(make_req(width=96, height=64))
    assert_valid(batch, 1, (96, 64))
    assert batch.pictures[0].rgb.shape == (64, 96, 3)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_scheduler_makes_a_valid_image(base_stage, name):
    made = make_scheduler(name, base_stage.pipe.scheduler.config)
    assert type(made) is getattr(diffusers, sampler(name).scheduler)
    for key, value in sampler(name).options.items():
        assert made.config[key] == value
    a = base_stage.run(make_req(scheduler=name, num_inference_steps=5))
    assert_valid(a, 1, (64, 64))
    assert same(a, base_stage.run(make_req(scheduler=name, num_inference_steps=5)))


def test_schedulers_differ(base_stage):
    images = {
        n: pixels(base_stage.run(make_req(scheduler=n, num_inference_steps=5)))
        for n in SAMPLER_NAMES
    }
    distinct = {images[n].tobytes() for n in SAMPLER_NAMES}
    assert len(distinct) >= 4, "samplers should not all give the same image"
    assert not np.array_equal(images["euler"], images["euler_a"])
    assert not np.array_equal(images["dpmpp_2m"], images["dpmpp_2m_karras"])


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("lms", {})


def test_scheduler_is_fresh_per_request(base_stage):
    shared = base_stage.pipe.scheduler
    base_stage.run(make_req(scheduler="dpmpp_2m"))
    assert base_stage.pipe.scheduler is shared and type(shared).__name__ == "EulerDiscreteScheduler"


# --- hires fix (img2img of upscaled pictures) ---------------------------------------------------


@pytest.fixture(scope="module")
def base_batch(base_stage):
    return base_stage.run(make_req(num_images=2, hires_fix=True))


def hires(stage, batch, **kw):
    return count_steps(stage.hires, batch, make_req(num_images=2, hires_fix=True, **kw))


def test_hires_keeps_size_seeds_and_input(refine_stage, base_batch):
    up = upscaled(base_batch, (128, 96))
    before = pixels(up).copy()
    out, _ = hires(refine_stage, up)
    assert_valid(out, 2, (128, 96))
    assert out.seeds == base_batch.seeds
    assert out.timings["base"] == base_batch.timings["base"] and out.timings["refine"] > 0
    assert np.array_equal(pixels(up), before), "the input batch must not be modified"
    assert not same(out, up)  # it did denoise
    again, _ = hires(refine_stage, up)
    assert same(out, again)


def test_hires_steps_zero_runs_int_steps_times_strength(refine_stage, base_batch):
    up = upscaled(base_batch)
    for steps, strength in [(4, 0.5), (8, 0.5), (8, 0.75), (10, 0.3)]:
        _, ran = hires(refine_stage, up, num_inference_steps=steps, denoising_strength=strength)
        assert len(ran) == int(steps * strength), (steps, strength)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_hires_steps_runs_exactly_that_many_steps(refine_stage, base_batch, strength):
    up = upscaled(base_batch)
    for hires_steps in (2, 3, 5):
        _, ran = hires(refine_stage, up, hires_steps=hires_steps, denoising_strength=strength)
        assert len(ran) == hires_steps


def test_hires_steps_changes_image(refine_stage, base_batch):
    up = upscaled(base_batch)
    a, _ = hires(refine_stage, up, hires_steps=2)
    b, _ = hires(refine_stage, up, hires_steps=5)
    assert not same(a, b)


def test_denoising_strength_changes_image(refine_stage, base_batch):
    up = upscaled(base_batch)
    low, _ = hires(refine_stage, up, denoising_strength=0.3, hires_steps=3)
    high, _ = hires(refine_stage, up, denoising_strength=0.8, hires_steps=3)
    assert not same(low, high)
    # Lower strength stays closer to the upscaled input.
    d_low = np.abs(pixels(low) - pixels(up)).mean()
    d_high = np.abs(pixels(high) - pixels(up)).mean()
    assert d_low < d_high


def test_hires_prompt_and_negative(refine_stage, base_batch):
    up = upscaled(base_batch)
    default, _ = hires(refine_stage, up)
    explicit, _ = hires(refine_stage, up, hires_prompt="a photo of a cat")  # == prompt
    other, _ = hires(refine_stage, up, hires_prompt="a red car")
    neg, _ = hires(refine_stage, up, negative_prompt="blurry")
    hires_neg, _ = hires(refine_stage, up, negative_prompt="blurry", hires_negative_prompt="ugly")
    assert same(default, explicit), "empty hires_prompt means the prompt"
    assert not same(default, other)
    assert not same(default, neg), "empty hires_negative_prompt means the negative prompt"
    assert not same(neg, hires_neg)


def test_hires_scheduler_and_guidance_apply(refine_stage, base_batch):
    up = upscaled(base_batch)
    euler, _ = hires(refine_stage, up)
    assert not same(euler, hires(refine_stage, up, scheduler="dpmpp_2m")[0])
    assert not same(euler, hires(refine_stage, up, guidance_scale=2.0)[0])


def test_hires_scheduler_and_guidance_of_their_own(refine_stage, base_batch):
    """hires_scheduler / hires_guidance_scale set the second pass alone; unset, it uses the
    first's."""
    up = upscaled(base_batch)
    default, _ = hires(refine_stage, up)
    own_sampler, _ = hires(refine_stage, up, hires_scheduler="dpmpp_2m")
    assert not same(default, own_sampler)
    assert same(own_sampler, hires(refine_stage, up, scheduler="dpmpp_2m")[0])
    assert same(
        own_sampler, hires(refine_stage, up, scheduler="ddim", hires_scheduler="dpmpp_2m")[0]
    )
    own_cfg, _ = hires(refine_stage, up, hires_guidance_scale=2.0)
    assert not same(default, own_cfg)
    assert same(own_cfg, hires(refine_stage, up, guidance_scale=9.0, hires_guidance_scale=2.0)[0])
    assert same(default, hires(refine_stage, up, hires_guidance_scale=make_req().guidance_scale)[0])


def test_hires_refuses_sizes_off_the_latent_grid(refine_stage, base_batch):
    with pytest.raises(ValueError, match="multiples of 8"):
        refine_stage.hires(upscaled(base_batch, (100, 100)), make_req(hires_fix=True))


def test_hires_schedule_length():
    assert hires_schedule_length(30, 0, 0.5) == 30  # diffusers then runs 15, as A1111
    assert hires_schedule_length(1, 0, 0.5) == 2  # never zero steps
    for hires_steps in range(1, 151):
        for strength in (0.01, 0.1, 0.29, 0.3, 0.33, 0.5, 0.7, 0.99, 1.0):
            n = hires_schedule_length(30, hires_steps, strength, max_steps=10**6)
            assert int(n * strength) == hires_steps and int((n - 1) * strength) < hires_steps
    assert hires_schedule_length(30, 150, 0.01) == 1000  # capped by the training schedule
    for strength in (0.001, 0.0015):  # the schema's floor: still at least one step
        assert int(hires_schedule_length(30, 5, strength) * strength) == 1
        assert int(hires_schedule_length(30, 0, strength) * strength) == 1


def test_lowest_strength_the_schema_accepts_runs_one_step(refine_stage, base_batch):
    _, ran = hires(refine_stage, upscaled(base_batch), denoising_strength=0.001, hires_steps=3)
    assert len(ran) == 1  # hires_steps 3 is capped by the schedule: one step, not an empty one


# --- ensemble of experts (refiner_switch_at) ----------------------------------------------------


@pytest.fixture(params=["base weights", "separate refiner"])
def finishing_stage(request, refine_stage, refiner_stage):
    return refine_stage if request.param == "base weights" else refiner_stage


def test_refiner_switch_at_runs_the_ensemble_path(base_stage, finishing_stage):
    req = make_req(num_inference_steps=10, refiner_switch_at=0.7, num_images=2)
    handed, base_steps = count_steps(base_stage.run, req)
    assert handed.pictures == [] and handed.latents.shape == (2, 4, 8, 8)
    assert handed.latents.device.type == "cpu"
    out, refine_steps = count_steps(finishing_stage.finish, handed, req)
    assert_valid(out, 2, (64, 64))
    assert out.latents is None and out.seeds == handed.seeds
    assert set(out.timings) == {"base", "refine"}
    # The base denoises the first 70 % of the schedule, the refine model the rest, no overlap.
    assert len(base_steps) + len(refine_steps) == 10 and len(refine_steps) == 3
    assert min(base_steps) > max(refine_steps)
    plain = base_stage.run(make_req(num_inference_steps=10, num_images=2))
    if finishing_stage.pipe.unet is base_stage.pipe.unet:
        # The same model finishing the same schedule: exactly one uninterrupted run.
        assert same(out, plain)
    else:
        assert not same(out, plain)
    again = finishing_stage.finish(base_stage.run(req), req)
    assert same(out, again)


def test_refiner_switch_at_value_matters(base_stage, refiner_stage):
    # (With the base weights finishing, any switch point gives the one uninterrupted run, see
    # above.)
    def run(switch):
        req = make_req(num_inference_steps=10, refiner_switch_at=switch)
        return refiner_stage.finish(base_stage.run(req), req)

    assert not same(run(0.5), run(0.8))


def test_finish_needs_latents(refine_stage, base_stage):
    with pytest.raises(ValueError, match="refiner_switch_at"):
        refine_stage.finish(base_stage.run(make_req()), make_req(refiner_switch_at=0.5))


def test_separate_refiner_differs_from_base_weights(
    base_stage, refine_stage, refiner_stage, base_batch
):
    up = upscaled(base_batch)
    assert not same(hires(refine_stage, up)[0], hires(refiner_stage, up)[0])


# --- overlapping requests -----------------------------------------------------------------------


def test_overlapping_requests_match_sequential_runs(base_stage, refine_stage):
    """Requests running at once in threads give the bit-identical pictures of sequential runs."""
    reqs = [
        make_req(seed=11, scheduler="euler_a", num_images=2, hires_fix=True),
        make_req(
            seed=22,
            scheduler="dpmpp_2m_karras",
            negative_prompt="blurry",
            hires_fix=True,
            hires_steps=3,
        ),
        make_req(seed=33, scheduler="unipc", guidance_scale=3.0, prompt="a castle", hires_fix=True),
        make_req(
            seed=44, scheduler="ddim", num_inference_steps=6, hires_fix=True, denoising_strength=0.7
        ),
    ]

    def full(req, barrier=None):
        if barrier is not None:
            barrier.wait()
        base = base_stage.run(req)
        return base, refine_stage.hires(upscaled(base), req)

    sequential = [full(r) for r in reqs]
    for _ in range(2):
        barrier = threading.Barrier(len(reqs))
        with ThreadPoolExecutor(len(reqs)) as pool:
            concurrent = list(pool.map(functools.partial(full, barrier=barrier), reqs))
        for (b1, h1), (b2, h2) in zip(sequential, concurrent):
            assert same(b1, b2) and same(h1, h2)


def test_prompt_encoding_is_safe_across_threads(base_stage):
    """Shared fast tokenizers switch padding settings inside encode_prompt; without serialising,
    overlapping calls mix them up (wrong shapes or wrong embeddings)."""
    from hiresfix.sdxl.generate import encode_prompt, request_pipeline

    prompts = [("a cat " * (1 + i % 4) + str(i), "blurry" * (i % 2)) for i in range(24)]
    pipe = request_pipeline(base_stage.pipe, "euler")
    expected = [encode_prompt(pipe, p, n, 5.0) for p, n in prompts]

    def encode(i):
        return encode_prompt(request_pipeline(base_stage.pipe, "euler"), *prompts[i], 5.0)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(encode, range(len(prompts))))
    for want, have in zip(expected, got):
        for key, tensor in want.items():
            assert torch.equal(tensor, have[key]), key


def test_overlapping_ensemble_requests(base_stage, refine_stage):
    reqs = [
        make_req(seed=s, num_inference_steps=8, refiner_switch_at=0.6, scheduler=n)
        for s, n in [(1, "euler"), (2, "euler_a"), (3, "dpmpp_2m")]
    ]

    def full(req):
        return refine_stage.finish(base_stage.run(req), req)

    sequential = [full(r) for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        concurrent = list(pool.map(full, reqs))
    assert all(same(a, b) for a, b in zip(sequential, concurrent))
