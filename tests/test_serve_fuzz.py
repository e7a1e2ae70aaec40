"""Schemathesis over `altdiff serve`'s own OpenAPI schema: whatever a schema-driven client or fuzzer sends,
no 5xx and every answer matches the schema. Bounded: a few examples per operation, small server limits."""

from __future__ import annotations

import pytest
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
