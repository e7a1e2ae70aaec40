"""Schemathesis over `altdiff serve`'s own OpenAPI schema: whatever a schema-driven client or fuzzer sends,
no 5xx and every answer matches the schema. Bounded: a few examples per operation, small server limits."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from serving import Server

from altdiff import webui
from altdiff.serve import ServeConfig


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, m9_folder):
    limits = webui.Limits(max_pixels=32 * 32, max_steps=2, max_batch_size=2, max_n_iter=2, max_upload_pixels=64 * 64)
    s = Server(ServeConfig(models=[str(m9_folder)], device="cpu", limits=limits,
                           outdir=str(tmp_path_factory.mktemp("fuzz"))))
    yield s
    s.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_no_server_error_and_every_answer_matches_the_schema(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    statuses = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):  # valid by the schema, then not
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance],
                                                  timeout=60)
                statuses.append(response.status_code)
            try:
                run()
            except Unsatisfiable:  # an operation without parameters has no invalid request
                assert mode == GenerationMode.NEGATIVE
    assert len(statuses) > 80 and 200 in statuses and 422 in statuses


def test_the_schema_carries_the_servers_limits_and_options(fuzz_server):
    """What the schema calls valid, the server takes; one past the schema's bound, it refuses naming the field
    (schema-driven clients once sent 'valid' requests that were refused)."""
    schema = requests.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()["components"]["schemas"]
    txt2img = schema["Txt2ImgRequest"]["properties"]
    assert txt2img["width"]["maximum"] == 32 * 32 // 8 and txt2img["width"]["multipleOf"] == 8
    assert txt2img["prompt"]["maxLength"] == webui.Limits().max_prompt_chars
    assert schema["Img2ImgRequest"]["properties"]["mask_blur"]["maximum"] == 256
    options = schema["Options"]["properties"]
    assert set(options) == {*webui.OVERRIDABLE, "samples_format"}
    assert fuzz_server.worker.options["sd_model_checkpoint"] in options["sd_model_checkpoint"]["enum"]
    base = {"prompt": "a cat", "width": 8, "height": 8, "steps": 1}
    for name in ("steps", "batch_size", "n_iter", "cfg_scale", "width", "hr_second_pass_steps"):
        top = txt2img[name]["maximum"]
        extra = {"enable_hr": True, "hr_upscaler": "Latent"} if name.startswith("hr_") else {}
        ok = requests.post(f"{fuzz_server.url}/sdapi/v1/txt2img", json={**base, **extra, name: top}, timeout=120)
        assert ok.status_code == 200, (name, ok.text)
        past = top + 8 if name == "width" else top + 1
        refused = requests.post(f"{fuzz_server.url}/sdapi/v1/txt2img", json={**base, **extra, name: past}, timeout=60)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == name, (name, refused.text)
