"""Safety checker parity with diffusers' StableDiffusionSafetyChecker and transformers' CLIPImageProcessor."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor

from altdiff.config import ConfigError, ImageProcessorConfig, SafetyConfig
from altdiff.safety import IGNORED_KEYS, SafetyChecker, load_safety_checker, preprocess
from altdiff.weights import WeightsError


@pytest.fixture(scope="module")
def checkers(m9_folder):
    ref = StableDiffusionSafetyChecker.from_pretrained(m9_folder / "safety_checker").eval()
    ours = load_safety_checker(m9_folder / "safety_checker", m9_folder / "feature_extractor")
    return ref, ours


@pytest.fixture
def fresh_checkers(m9_folder):
    """A pair whose thresholds a test may change."""
    ref = StableDiffusionSafetyChecker.from_pretrained(m9_folder / "safety_checker").eval()
    ours = load_safety_checker(m9_folder / "safety_checker", m9_folder / "feature_extractor")
    return ref, ours


def set_thresholds(models, concept=None, special=None):
    with torch.no_grad():
        for m in models:
            if concept is not None:
                m.concept_embeds_weights.copy_(concept)
            if special is not None:
                m.special_care_embeds_weights.copy_(special)


def ref_flags(ref, clip_input):
    return ref(clip_input=clip_input, images=torch.zeros(clip_input.shape[0], 3, 8, 8))[1]


def ref_cosines(ref, clip_input):
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(clip_input)[1])
    return cosine_distance(embeds, ref.concept_embeds), cosine_distance(embeds, ref.special_care_embeds)


def test_full_size_state_dict_matches_diffusers():
    config = CLIPConfig(
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"},
        projection_dim=768)
    with torch.device("meta"):
        ref = StableDiffusionSafetyChecker(config)
        ours = SafetyChecker(SafetyConfig.from_dict(config.to_dict()))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(IGNORED_KEYS)}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert our_shapes["concept_embeds"] == (17, 768) and our_shapes["special_care_embeds"] == (3, 768)
    assert our_shapes["vision_model.vision_model.pre_layrnorm.weight"] == (1024,)
    n = sum(v.numel() for v in ours.state_dict().values())
    print(f"ViT-L/14 safety checker: {n:,} parameters")
    assert n == sum(v.numel() for v in ref.state_dict().values())


def test_image_embeds_match_diffusers(checkers):
    ref, ours = checkers
    clip_input = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(clip_input)[1])
    err = max_abs(ours.image_embeds(clip_input), expected)
    print(f"image_embeds max-abs vs diffusers: {err:.2e}")
    assert err <= 1e-5


def test_flags_match_diffusers_on_saved_weights(m9_folder, tmp_path, checkers):
    from safetensors.torch import load_file, save_file

    clip_input = torch.randn(6, 3, 32, 32)
    concept_cos, _ = ref_cosines(checkers[0], clip_input)
    # The tiny checker's own thresholds flag nothing, so an all-False comparison could not fail: save
    # thresholds that about half of the images pass, then load both checkers from the files.
    checker, features = copy_checker(m9_folder, tmp_path)
    state = load_file(checker / "model.safetensors")
    state["concept_embeds_weights"] = unreachable(concept_cos)
    state["concept_embeds_weights"][3] = concept_cos[:, 3].median()
    save_file(state, checker / "model.safetensors")
    ref = StableDiffusionSafetyChecker.from_pretrained(checker).eval()
    expected = ref_flags(ref, clip_input)
    assert any(expected) and not all(expected)
    assert load_safety_checker(checker, features)(clip_input) == expected


def unreachable(cos):
    return cos.max(dim=0).values + 0.5


def clear_winner(cos, gap=0.02):
    """(image, concept) where one image's cosine beats every other image's by more than `gap`."""
    top = cos.topk(2, dim=0)
    concept = int((top.values[0] - top.values[1]).argmax())
    assert top.values[0, concept] - top.values[1, concept] > gap
    return int(top.indices[0, concept]), concept


def test_forced_hits_match_diffusers(fresh_checkers):
    ref, ours = fresh_checkers
    clip_input = torch.randn(8, 3, 32, 32)
    concept_cos, _ = ref_cosines(ref, clip_input)
    concept = unreachable(concept_cos)
    concept[5] = concept_cos[:, 5].median()  # about half of the images hit concept 5
    set_thresholds((ref, ours), concept=concept)
    expected = ref_flags(ref, clip_input)
    assert any(expected) and not all(expected)
    assert ours(clip_input) == expected


def test_special_care_adjustment_changes_outcome_as_in_diffusers(fresh_checkers):
    ref, ours = fresh_checkers
    clip_input = torch.randn(3, 3, 32, 32)
    concept_cos, special_cos = ref_cosines(ref, clip_input)
    image, j = clear_winner(concept_cos)
    # The image scores -0.005 on concept j: not a hit alone, a hit after the +0.01 special-care adjustment.
    concept = unreachable(concept_cos)
    concept[j] = concept_cos[image, j] + 0.005
    special = unreachable(special_cos)
    set_thresholds((ref, ours), concept=concept, special=special)
    without = ref_flags(ref, clip_input)
    assert without == [False] * 3 and ours(clip_input) == without
    special[1] = special_cos[:, 1].max() - 0.1  # some images (the winner among them) hit special care
    set_thresholds((ref, ours), special=special)
    with_adjustment = ref_flags(ref, clip_input)
    assert with_adjustment == [i == image for i in range(3)] and ours(clip_input) == with_adjustment


@pytest.mark.parametrize("margin, flagged", [(0.0004, False), (0.0006, True)])
def test_scores_are_rounded_to_three_decimals_as_in_diffusers(fresh_checkers, margin, flagged):
    ref, ours = fresh_checkers
    clip_input = torch.randn(3, 3, 32, 32)
    concept_cos, special_cos = ref_cosines(ref, clip_input)
    image, j = clear_winner(concept_cos)
    concept = unreachable(concept_cos)
    concept[j] = concept_cos[image, j] - margin  # a raw score of +margin: rounds to 0.0 (no hit) or 0.001 (hit)
    set_thresholds((ref, ours), concept=concept, special=unreachable(special_cos))
    expected = [flagged and i == image for i in range(3)]
    assert ref_flags(ref, clip_input) == expected
    assert ours(clip_input) == expected


def pil_reference(images, processor):
    """What diffusers' run_safety_checker feeds the checker: uint8 PIL images through CLIPImageProcessor."""
    arrays = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return processor([Image.fromarray(a) for a in arrays], return_tensors="pt").pixel_values


def smooth_images(n, height, width):
    # Random noise plus smooth structure, like decoded images: exercises the resampling filter everywhere.
    coarse = F.interpolate(torch.rand(n, 3, 6, 6), size=(height, width), mode="bicubic", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(n, 3, height, width)).clamp(0, 1)


REAL = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


@pytest.mark.parametrize("processor_kwargs, height, width", [
    (REAL, 512, 512), (REAL, 512, 768), (REAL, 768, 512),
    ("tiny", 512, 512), ("tiny", 512, 768),
    ("tiny", 160, 40),  # a tall image: Pillow >= 13 resamples vertically first
    ("tiny", 20, 24),  # upscaling
    ({"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 30}, "resample": 2}, 48, 40),  # padding
    ({"size": {"height": 40, "width": 30}, "do_center_crop": False, "do_normalize": False}, 64, 64),
])
def test_preprocess_matches_clip_image_processor_exactly(m9_folder, processor_kwargs, height, width):
    if processor_kwargs == "tiny":
        processor = CLIPImageProcessor.from_pretrained(m9_folder / "feature_extractor")
        config = ImageProcessorConfig.from_json(m9_folder / "feature_extractor" / "preprocessor_config.json")
    else:
        processor = CLIPImageProcessor(**processor_kwargs)
        config = ImageProcessorConfig.from_dict(processor.to_dict())
    images = smooth_images(2, height, width)
    ours, expected = preprocess(images, config), pil_reference(images, processor)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    err = max_abs(ours, expected)
    print(f"preprocess {height}x{width} {processor_kwargs}: max-abs {err}")
    # Resizing goes through Pillow, as in CLIPImageProcessor, so the pixel values are identical.
    assert err == 0.0


def test_check_matches_pipeline_run_safety_checker(m9_folder, fresh_checkers):
    import tiny

    pipe = tiny.load_reference(m9_folder)
    ref, ours = pipe.safety_checker, fresh_checkers[1]
    decoded = smooth_images(6, 64, 64) * 2 - 1  # the VAE output range the pipeline passes
    clip_input = preprocess((decoded / 2 + 0.5).clamp(0, 1), ours.processor)
    concept_cos, _ = ref_cosines(ref, clip_input)
    concept = unreachable(concept_cos)
    concept[5] = concept_cos[:, 5].median()
    set_thresholds((ref, ours), concept=concept)
    _, expected = pipe.run_safety_checker(decoded.clone(), "cpu", torch.float32)
    assert any(expected) and not all(expected)
    assert ours.check((decoded / 2 + 0.5).clamp(0, 1)) == expected


def copy_checker(m9_folder, tmp_path):
    shutil.copytree(m9_folder / "safety_checker", tmp_path / "safety_checker")
    shutil.copytree(m9_folder / "feature_extractor", tmp_path / "feature_extractor")
    return tmp_path / "safety_checker", tmp_path / "feature_extractor"


def test_load_bin_with_legacy_position_ids_and_variants(m9_folder, tmp_path, checkers):
    from safetensors.torch import load_file, save_file

    checker, features = copy_checker(m9_folder, tmp_path)
    state = load_file(checker / "model.safetensors")
    (checker / "model.safetensors").unlink()
    legacy = dict(state, **{IGNORED_KEYS[0]: torch.arange(65)[None]})
    torch.save(legacy, checker / "pytorch_model.bin")
    clip_input = torch.randn(2, 3, 32, 32)
    expected = checkers[1].image_embeds(clip_input)
    assert torch.equal(load_safety_checker(checker, features).image_embeds(clip_input), expected)
    # A present variant wins; an absent one falls back to the plain file.
    save_file({k: v * 2 if k == "visual_projection.weight" else v for k, v in state.items()},
              str(checker / "model.fp16.safetensors"))
    assert torch.equal(load_safety_checker(checker, features, variant="fp16").image_embeds(clip_input), 2 * expected)
    assert torch.equal(load_safety_checker(checker, features, variant="ema").image_embeds(clip_input), expected)


def test_load_dtype(m9_folder, fresh_checkers):
    ref, _ = fresh_checkers
    checker = load_safety_checker(m9_folder / "safety_checker", m9_folder / "feature_extractor",
                                  dtype=torch.bfloat16)
    assert checker.visual_projection.weight.dtype == torch.bfloat16
    assert checker.vision_model.vision_model.embeddings.position_embedding.weight.dtype == torch.bfloat16
    assert len(checker.check(torch.rand(2, 3, 40, 48))) == 2
    clip_input = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        want = ref.visual_projection(ref.vision_model(clip_input)[1])
    got = checker.image_embeds(clip_input.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and max_abs(got, want) <= 0.05 * want.abs().max().item()
    # Flags as diffusers' fp32 checker gives them, with a threshold no score is within bf16 rounding of: the
    # midpoint of the widest gap between two images' scores on one concept.
    concept_cos, special_cos = ref_cosines(ref, clip_input)
    bf16_error = (cosine_distance(got.float(), checker.concept_embeds.float()) - concept_cos).abs().max()
    ordered = concept_cos.sort(dim=0).values
    gaps = ordered[1:] - ordered[:-1]
    row, concept = divmod(int(gaps.argmax()), gaps.shape[1])
    assert gaps[row, concept] / 2 > 3 * bf16_error
    thresholds = unreachable(concept_cos)
    thresholds[concept] = (ordered[row, concept] + ordered[row + 1, concept]) / 2
    set_thresholds((ref, checker), concept=thresholds, special=unreachable(special_cos))
    expected = ref_flags(ref, clip_input)
    assert any(expected) and not all(expected)
    assert checker(clip_input.to(torch.bfloat16)) == expected


def test_load_errors(m9_folder, tmp_path):
    checker, features = copy_checker(m9_folder, tmp_path)
    (features / "preprocessor_config.json").rename(features / "other.json")
    with pytest.raises(ConfigError, match="preprocessor_config.json: config file not found"):
        load_safety_checker(checker, features)
    (features / "other.json").rename(features / "preprocessor_config.json")

    (checker / "model.safetensors").rename(checker / "weights.safetensors")
    with pytest.raises(WeightsError, match="no weights file.*pytorch_model.bin"):
        load_safety_checker(checker, features)

    with pytest.raises(ConfigError, match="config.json: config file not found"):
        load_safety_checker(tmp_path / "missing", features)


@pytest.mark.parametrize("change, message", [
    ({"resample": 99}, "resample=99 is not supported"),
    ({"crop_size": {"height": 24, "width": 24}}, "does not match the checker's image_size=32"),
])
def test_unsupported_preprocessor_configs(m9_folder, tmp_path, change, message):
    import json

    checker, features = copy_checker(m9_folder, tmp_path)
    path = features / "preprocessor_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    with pytest.raises(ConfigError, match=message):
        load_safety_checker(checker, features)


def test_input_errors(checkers):
    ours = checkers[1]
    with pytest.raises(ValueError, match=r"clip_input must have shape \(batch, 3, 32, 32\), got \(1, 3, 24, 24\)"):
        ours(torch.zeros(1, 3, 24, 24))
    with pytest.raises(TypeError, match="clip_input must be a floating-point tensor, got ndarray"):
        ours(np.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, height, width\), got \(3, 8, 8\)"):
        ours.check(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="images must be a floating-point tensor, got a torch.uint8 tensor"):
        ours.check(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
