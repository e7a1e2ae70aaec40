"""Session-scoped tiny pipelines, built once by diffusers (the oracle) and saved in diffusers layout."""

import os
import warnings

import pytest
import tiny
import torch
from hypothesis import settings

warnings.filterwarnings("ignore", message=".*accelerate.*")

# CI draws the property-test examples from a fixed seed, so a landing never depends on a lucky draw; local
# runs keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fp32_determinism():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def m9_folder(tiny_root):
    """A tiny SD1.x-style AltDiffusion-m9 folder (XLM-R last state → `transformation`)."""
    return tiny.build_pipeline_folder(tiny_root, "m9")


@pytest.fixture(scope="session")
def m18_folder(tiny_root):
    """A tiny SD2-style AltDiffusion-m18 folder (hidden_states[-2] → pre_LN → `transformation_pre`)."""
    return tiny.build_pipeline_folder(tiny_root, "m18")


@pytest.fixture(scope="session", params=["m9", "m18"])
def tiny_folder(request, m9_folder, m18_folder):
    return {"m9": m9_folder, "m18": m18_folder}[request.param]


def max_abs(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()
