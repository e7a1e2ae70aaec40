"""altdiff.text_encoder against diffusers' RobertaSeriesModelWithTransformation on the tiny m9/m18 weights."""

import json
import shutil

import pytest
import torch
from conftest import max_abs
from safetensors.torch import load_file, save_file

from altdiff.config import ConfigError, TextEncoderConfig
from altdiff.text_encoder import IGNORED_KEYS, TextEncoder, load_text_encoder
from altdiff.weights import WeightsError

PROMPTS = ["a cat wearing a hat, highly detailed oil painting", "一只戴着帽子的猫", "宇宙飛行士が月で馬に乗っている写真",
           "모자를 쓴 고양이", "قطة ترتدي قبعة", "кошка в шляпе", "टोपी पहने एक बिल्ली", "", "🐱 <mask> été"]


def reference_model(folder):
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesModelWithTransformation,
    )

    return RobertaSeriesModelWithTransformation.from_pretrained(folder / "text_encoder").eval()


def tokenize(folder, prompts, **kw):
    from transformers import XLMRobertaTokenizer

    tok = XLMRobertaTokenizer(vocab_file=str(folder / "tokenizer" / "sentencepiece.bpe.model"),
                              model_max_length=77)
    kw = {"padding": "max_length", "max_length": 77, "truncation": True, **kw}
    return tok(prompts, return_tensors="pt", **kw)


@pytest.fixture(scope="module")
def models(tiny_folder):
    return load_text_encoder(tiny_folder / "text_encoder"), reference_model(tiny_folder), tiny_folder


@torch.no_grad()
def test_projection_matches_diffusers(models):
    ours, ref, folder = models
    batch = tokenize(folder, PROMPTS)
    assert (batch.attention_mask == 0).any()
    # As diffusers' encode_prompt calls it (config.use_attention_mask is True).
    assert ours.config.use_attention_mask
    want = ref(batch.input_ids, attention_mask=batch.attention_mask).projection_state
    got = ours(batch.input_ids, batch.attention_mask)
    assert got.shape == want.shape == (len(PROMPTS), 77, ours.config.project_dim)
    assert max_abs(got, want) <= 1e-5
    # Without a mask the padding is attended to, which changes the output: the mask is not a no-op.
    unmasked = ours(batch.input_ids)
    assert max_abs(unmasked, ref(batch.input_ids).projection_state) <= 1e-5
    assert max_abs(unmasked, got) > 1e-2


@torch.no_grad()
def test_longest_padding_and_inner_pads_match_diffusers(models):
    ours, ref, folder = models
    batch = tokenize(folder, PROMPTS[:4], padding="longest")
    assert max_abs(ours(batch.input_ids, batch.attention_mask),
                   ref(batch.input_ids, attention_mask=batch.attention_mask).projection_state) <= 1e-5
    # Pad ids inside the sequence get position padding_idx and do not advance the others' positions.
    ids = torch.tensor([[0, 40, 1, 1, 41, 42, 2], [0, 1, 50, 51, 52, 53, 2]])
    assert max_abs(ours(ids), ref(ids).projection_state) <= 1e-5


@torch.no_grad()
def test_clip_skip_matches_hand_definition(models):
    ours, ref, folder = models
    batch = tokenize(folder, PROMPTS)
    out = ref(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    assert len(out.hidden_states) == ours.config.num_hidden_layers + 1
    m18 = ours.config.has_pre_transformation
    for clip_skip in range(len(out.hidden_states)):
        hidden = out.hidden_states[-(clip_skip + 1)]
        want = ref.transformation_pre(ref.pre_LN(hidden)) if m18 else ref.transformation(hidden)
        got = ours(batch.input_ids, batch.attention_mask, clip_skip=clip_skip)
        assert max_abs(got, want) <= 1e-5, clip_skip
    default = ours(batch.input_ids, batch.attention_mask)
    assert torch.equal(ours(batch.input_ids, batch.attention_mask, clip_skip=1 if m18 else 0), default)
    assert max_abs(ours(batch.input_ids, batch.attention_mask, clip_skip=2), default) > 1e-2


@torch.no_grad()
def test_dtype_and_variant(models, tmp_path):
    _, _, folder = models
    shutil.copy(folder / "text_encoder" / "config.json", tmp_path)
    sd = load_file(folder / "text_encoder" / "model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, tmp_path / "model.fp16.safetensors")
    save_file(sd, tmp_path / "model.safetensors")
    half = load_text_encoder(tmp_path, variant="fp16")
    assert half.transformation.weight.dtype == torch.float16
    double = load_text_encoder(tmp_path, dtype=torch.float64, device="cpu")
    batch = tokenize(folder, PROMPTS)
    got = double(batch.input_ids, batch.attention_mask)
    assert got.dtype == torch.float64 and double.dtype == torch.float64 and double.device.type == "cpu"
    ref64 = reference_model(folder).double()
    want = ref64(batch.input_ids, attention_mask=batch.attention_mask).projection_state
    assert max_abs(got, want) <= 1e-10


def test_checkpoint_extra_keys(models, tmp_path):
    _, _, folder = models
    shutil.copy(folder / "text_encoder" / "config.json", tmp_path)
    sd = load_file(folder / "text_encoder" / "model.safetensors")
    assert any(k.startswith("roberta.pooler.") for k in sd)
    extra = {"roberta.embeddings.position_ids": torch.arange(80)[None], "logit_scale": torch.ones(())}
    save_file({**sd, **extra}, tmp_path / "model.safetensors")
    load_text_encoder(tmp_path)
    save_file({**sd, "roberta.encoder.extra.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="unexpected keys"):
        load_text_encoder(tmp_path)
    del sd["roberta.encoder.layer.0.attention.self.query.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="missing keys"):
        load_text_encoder(tmp_path)


FULL_SIZE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 4096, "vocab_size": 250002, "max_position_embeddings": 514,
             "type_vocab_size": 1, "layer_norm_eps": 1e-5}


@pytest.mark.parametrize("variant", ["m9", "m18"])
def test_full_size_keys_and_shapes_match_diffusers(variant):
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig,
        RobertaSeriesModelWithTransformation,
    )

    extra = {"project_dim": 768} if variant == "m9" else {"project_dim": 1024, "has_pre_transformation": True}
    with torch.device("meta"):
        ref = RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**FULL_SIZE, **extra))
        ours = TextEncoder(TextEncoderConfig(**FULL_SIZE, **extra))
    ref_sd = ref.state_dict()
    assert any(k.startswith(IGNORED_KEYS) for k in ref_sd)  # the pooler
    want = {k: v.shape for k, v in ref_sd.items() if not k.startswith(IGNORED_KEYS)}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == want
    assert all(t.is_meta for t in ours.state_dict().values())
    count = sum(p.numel() for p in ours.parameters())
    ref_count = sum(p.numel() for p in ref.parameters())
    print(f"\n{variant}: altdiff {count / 1e6:.2f}M parameters, diffusers {ref_count / 1e6:.2f}M "
          "(with pooler)")
    assert count == sum(v.numel() for v in ref_sd.values()) - sum(
        v.numel() for k, v in ref_sd.items() if k.startswith(IGNORED_KEYS))


def test_clip_skip_errors(models):
    ours, _, _ = models
    ids = torch.tensor([[0, 40, 2]])
    n = ours.config.num_hidden_layers + 1
    for bad in (-1, n, n + 5, 1.0, "1", True):
        with pytest.raises(ValueError, match="clip_skip"):
            ours(ids, clip_skip=bad)


def test_input_errors(models):
    ours, _, _ = models
    limit = ours.config.max_position_embeddings - 2
    for bad in ([[0, 40, 2]], torch.tensor([0, 40, 2]), torch.zeros(1, 1, 3, dtype=torch.long),
                torch.tensor([[0.0, 40.0, 2.0]]), torch.tensor([[True, False]]),
                torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, limit + 1, dtype=torch.long),
                torch.tensor([[0, -1, 2]]), torch.tensor([[0, ours.config.vocab_size, 2]])):
        with pytest.raises(ValueError, match="input_ids"):
            ours(bad)
    ours(torch.zeros(2, limit, dtype=torch.long))  # the longest allowed
    ids = torch.tensor([[0, 40, 2]])
    for bad in (torch.ones(1, 4), torch.ones(3), [[1, 1, 1]]):
        with pytest.raises(ValueError, match="attention_mask"):
            ours(ids, bad)


def test_load_errors(models, tmp_path):
    _, _, folder = models
    with pytest.raises(ConfigError, match="config.json"):
        load_text_encoder(tmp_path)
    shutil.copy(folder / "text_encoder" / "config.json", tmp_path)
    with pytest.raises(WeightsError, match="no weights file"):
        load_text_encoder(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        load_text_encoder(tmp_path)
