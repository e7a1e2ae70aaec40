"""altdiff.rng: the webui's noise sources against oracles others wrote: Random123's Philox4x32-10 known-answer
vectors, the CUDA values rng_philox.py's docstring quotes, torch generators seeded the webui's way, and
k-diffusion's BrownianTreeNoiseSampler."""

import pytest
import torch

from altdiff.rng import (
    BrownianTreeNoise,
    ImageRNG,
    PhiloxGenerator,
    create_generator,
    philox4x32_10,
    rng_noise_sampler,
    slerp,
)

SHAPE = (4, 8, 6)


# Random123 (D. E. Shaw Research) kat_vectors for philox4x32 with 10 rounds: counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_matches_random123_known_answers():
    counter = torch.tensor([k[0] for k in KAT], dtype=torch.int64).T.contiguous()
    key = torch.tensor([k[1] for k in KAT], dtype=torch.int64).T.contiguous()
    out = philox4x32_10(counter, key)
    assert out.T.tolist() == [list(k[2]) for k in KAT]


def test_nv_matches_the_cuda_values_rng_philox_quotes():
    # rng_philox.py's docstring: Generator(seed=0).randn((3, 4)), CUDA's torch.randn printed to 8 digits.
    expected = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                             [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                             [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 4e-7  # a few float32 ulp: CUDA's sin/log differ from float64's
    assert (PhiloxGenerator(1).randn((3, 4)) - expected).abs().max() > 0.1


def test_nv_counter_layout_element_index_and_offset():
    g = PhiloxGenerator(2**40 + 7)  # a seed over 32 bits uses both key words
    first, second = g.randn((2, 6)), g.randn((12,))
    assert torch.equal(first.flatten(), PhiloxGenerator(2**40 + 7).randn((12,)))  # counter[2] = element index
    assert not torch.equal(first.flatten(), second)  # counter[0] = draw number
    assert not torch.equal(first, PhiloxGenerator(7).randn((2, 6)))


@pytest.mark.parametrize("source", ["CPU", "GPU"])
def test_cpu_and_gpu_sources_on_cpu_are_torch_generators_seeded_with_the_image_seed(source):
    rng = ImageRNG(SHAPE, seeds=[5, 6], source=source)
    refs = [torch.Generator().manual_seed(s) for s in (5, 6)]
    first = torch.stack([torch.randn(SHAPE, generator=g) for g in refs])
    second = torch.stack([torch.randn(SHAPE, generator=g) for g in refs])
    assert torch.equal(rng.next(), first)  # the first next() is first()
    assert torch.equal(rng.next(), second)
    assert not torch.equal(first[0], first[1])


def test_nv_source_draws_one_philox_generator_per_image():
    rng = ImageRNG(SHAPE, seeds=[3, 4], source="NV")
    refs = [PhiloxGenerator(3), PhiloxGenerator(4)]
    assert torch.equal(rng.first(), torch.stack([g.randn(SHAPE) for g in refs]))
    assert torch.equal(rng.next(), torch.stack([g.randn(SHAPE) for g in refs]))


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_ensd_reseeds_every_generator_after_the_first_draw(source):
    rng = ImageRNG(SHAPE, seeds=[10, 11], source=source, eta_noise_seed_delta=31337)
    plain = ImageRNG(SHAPE, seeds=[10, 11], source=source)
    assert torch.equal(rng.next(), plain.next())  # the starting noise is the seed's
    step = torch.stack([create_generator(s + 31337, source).randn(SHAPE) if source == "NV"
                        else torch.randn(SHAPE, generator=torch.Generator().manual_seed(s + 31337))
                        for s in (10, 11)])
    assert torch.equal(rng.next(), step)
    assert not torch.equal(step, plain.next())


def test_subseeds_slerp_each_image_toward_its_subseed_noise():
    def noise(seed):
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))

    for strength, target in ((0.0, None), (1.0, "sub")):
        rng = ImageRNG(SHAPE, seeds=[1, 2], subseeds=[7], subseed_strength=strength, source="CPU")
        got = rng.first()
        if target is None:
            assert torch.equal(got, torch.stack([noise(1), noise(2)]))  # strength 0 draws no subnoise
        else:  # strength 1 is the subseed's noise; a missing subseed is subseed 0, as the webui does
            assert torch.allclose(got, torch.stack([noise(7), noise(0)]), atol=1e-5)
    half = ImageRNG(SHAPE, seeds=[1], subseeds=[7], subseed_strength=0.5, source="CPU").first()[0]
    assert torch.equal(half, slerp(0.5, noise(1), noise(7)))
    # slerp keeps the noise's scale where a plain average would shrink it by about 1/sqrt(2).
    assert abs(half.std().item() - 1) < 0.1 and abs((noise(1) + noise(7)).div(2).std().item() - 1) > 0.2
    # ...and the step noise still comes from the image's own seed.
    rng = ImageRNG(SHAPE, seeds=[1], subseeds=[7], subseed_strength=0.5, source="CPU")
    rng.next()
    g = torch.Generator().manual_seed(1)
    torch.randn(SHAPE, generator=g)
    assert torch.equal(rng.next()[0], torch.randn(SHAPE, generator=g))


def test_seed_resize_pastes_the_smaller_seed_noise_centred():
    rng = ImageRNG((4, 8, 8), seeds=[3], source="CPU", seed_resize_from_h=32, seed_resize_from_w=48)
    got = rng.first()[0]
    small = torch.randn((4, 4, 6), generator=torch.Generator().manual_seed(3))
    base = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got[:, 2:6, 1:7], small)
    assert torch.equal(got[:, :2], base[:, :2]) and torch.equal(got[:, :, :1], base[:, :, :1])
    big = ImageRNG((4, 4, 4), seeds=[3], source="CPU", seed_resize_from_h=64, seed_resize_from_w=64)
    big = big.first()[0]
    assert torch.equal(big, torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))[:, 2:6, 2:6])


def test_noise_sampler_adapter_draws_from_the_image_rng():
    rng, ref = ImageRNG(SHAPE, seeds=[8], source="CPU"), ImageRNG(SHAPE, seeds=[8], source="CPU")
    sampler = rng_noise_sampler(rng)
    rng.first()
    ref.next()
    assert torch.equal(sampler(torch.tensor(2.0), torch.tensor(1.0)), ref.next())


def test_brownian_noise_equals_kdiffusion_brownian_tree_noise_sampler():
    from kdiffusion_oracle import sampling

    x = torch.zeros(3, *SHAPE)
    seeds = [100, 101, 100]
    sigmas = torch.tensor([14.6, 7.0, 2.5, 0.9, 0.03])
    ours = BrownianTreeNoise(x, sigmas.min(), sigmas.max(), seeds)
    theirs = sampling.BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), seed=seeds)
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        mine = ours(a, b)
        assert torch.equal(mine, theirs(a, b))
    assert torch.equal(mine[0], mine[2]) and not torch.equal(mine[0], mine[1])  # per image, by seed
    alone = BrownianTreeNoise(x[:1], sigmas.min(), sigmas.max(), [101])
    assert torch.equal(alone(sigmas[-2], sigmas[-1])[0], mine[1])  # batch-independent


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="rng: expected one of GPU, CPU, NV"):
        ImageRNG(SHAPE, seeds=[1], source="cuda")
    with pytest.raises(ValueError, match="shape"):
        ImageRNG((1, *SHAPE), seeds=[1])
    with pytest.raises(ValueError, match="seeds"):
        ImageRNG(SHAPE, seeds=[])
    with pytest.raises(ValueError, match="seeds: expected one per image"):
        BrownianTreeNoise(torch.zeros(2, *SHAPE), 0.1, 10.0, [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_source_is_torch_cuda_randn_and_nv_comes_within_rounding():
    rng = ImageRNG(SHAPE, seeds=[1234, 1235], source="GPU", device="cuda")
    got = rng.next()
    refs = [torch.Generator("cuda").manual_seed(s) for s in (1234, 1235)]
    assert got.device.type == "cuda"
    assert torch.equal(got, torch.stack([torch.randn(SHAPE, generator=g, device="cuda") for g in refs]))
    nv = ImageRNG(SHAPE, seeds=[1234, 1235], source="NV", device="cuda").next()
    assert nv.device.type == "cuda" and (nv - got).abs().max().item() < 1e-5
