"""Loader errors: each bad file raises WeightsError naming the file and the problem."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from altdiff.weights import SafetensorsFile, WeightsError, find_weights, load_module, read_state_dict


def _linear():
    return nn.Linear(4, 3)


@pytest.fixture
def good(tmp_path):
    sd = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_roundtrip_loads_exact_values_on_meta_built_module(good):
    path, sd = good
    model = load_module(_linear, read_state_dict(path), str(path))
    assert torch.equal(model.weight, sd["weight"]) and torch.equal(model.bias, sd["bias"])
    assert not model.weight.requires_grad and not model.training


def test_dtype_cast(good):
    path, _ = good
    model = load_module(_linear, read_state_dict(path), str(path), dtype=torch.float16)
    assert model.weight.dtype == torch.float16


def test_truncated_safetensors(good, tmp_path):
    path, _ = good
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 10])
    with pytest.raises(WeightsError, match=r"trunc\.safetensors.*truncated"):
        read_state_dict(bad)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\xff" * 8 + b"{}"])
def test_empty_or_garbage_safetensors(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match="bad.safetensors"):
        read_state_dict(bad)


def test_header_offsets_past_end(tmp_path):
    import json
    import struct
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    bad = tmp_path / "lies.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(WeightsError, match=r"lies\.safetensors.*truncated"):
        read_state_dict(bad)


def test_missing_key(tmp_path):
    path = tmp_path / "missing.safetensors"
    save_file({"weight": torch.randn(3, 4)}, str(path))
    with pytest.raises(WeightsError, match=r"missing\.safetensors.*1 missing keys: bias"):
        load_module(_linear, read_state_dict(path), str(path))


def test_unexpected_key_and_ignore(tmp_path):
    path = tmp_path / "extra.safetensors"
    save_file({"weight": torch.randn(3, 4), "bias": torch.randn(3), "pooler.w": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError, match=r"1 unexpected keys: pooler\.w"):
        load_module(_linear, read_state_dict(path), str(path))
    load_module(_linear, read_state_dict(path), str(path), ignore=("pooler.",))


def test_wrong_shape(tmp_path):
    path = tmp_path / "shape.safetensors"
    save_file({"weight": torch.randn(3, 5), "bias": torch.randn(3)}, str(path))
    with pytest.raises(WeightsError, match=r"shape\.safetensors.*weight \(3, 5\) \(model expects \(3, 4\)\)"):
        load_module(_linear, read_state_dict(path), str(path))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.bin"
    torch.save({"weight": _Payload(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(WeightsError, match=r"evil\.bin.*refused to unpickle"):
        read_state_dict(bad)
    assert not marker.exists()


def test_bin_with_non_tensor_object(tmp_path):
    bad = tmp_path / "obj.bin"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, bad)
    with pytest.raises(WeightsError, match=r"obj\.bin.*expected only tensors"):
        read_state_dict(bad)


def test_plain_pickle_file(tmp_path):
    bad = tmp_path / "plain.ckpt"
    bad.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(WeightsError, match="plain.ckpt"):
        read_state_dict(bad)


def test_ckpt_state_dict_wrapper(tmp_path):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}}, path)
    model = load_module(_linear, read_state_dict(path), str(path))
    assert torch.equal(model.weight, torch.ones(3, 4))


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        read_state_dict(odd)


def test_find_weights_prefers_variant_then_safetensors(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert find_weights(tmp_path).name == "pytorch_model.bin"  # transformers' pickled name
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert find_weights(tmp_path).name == "model.safetensors"
    assert find_weights(tmp_path, "fp16").name == "model.safetensors"  # absent variant: plain file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.fp16.safetensors"))
    assert find_weights(tmp_path, "fp16").name == "model.fp16.safetensors"
    with pytest.raises(WeightsError, match="no weights file"):
        find_weights(tmp_path / "nothing")


def test_safetensors_checked_from_the_header_then_read_one_tensor_at_a_time(good, monkeypatch):
    path, sd = good
    weights = SafetensorsFile(path)
    assert weights.meta == {"weight": ((3, 4), torch.float32), "bias": ((3,), torch.float32)}
    assert set(weights) == {"weight", "bias"}
    reads = []
    read = SafetensorsFile.__getitem__
    monkeypatch.setattr(SafetensorsFile, "__getitem__", lambda self, key: reads.append(key) or read(self, key))
    with pytest.raises(WeightsError, match=r"1 shape mismatches: weight \(3, 4\) \(model expects \(3, 5\)\)"):
        load_module(lambda: nn.Linear(5, 3), weights, str(path))
    assert reads == []  # refused from the header alone
    model = load_module(_linear, weights, str(path), dtype=torch.float16, device="cpu")
    assert sorted(reads) == ["bias", "weight"]
    assert model.weight.dtype == torch.float16 and torch.equal(model.weight, sd["weight"].half())
    with pytest.raises(KeyError):
        weights["nope"]
    with pytest.raises(WeightsError, match="weights file not found"):
        SafetensorsFile(path.with_name("missing.safetensors"))
