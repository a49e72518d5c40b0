"""Property-based tests of `mmrag serve` against its own live `/openapi.json` (schemathesis): for
generated requests, valid and invalid, the server never answers 5xx, and every answer (status,
content type, body) is one the schema declares; invalid requests are refused.

Bounded to the cheap endpoints (search, records list/get/image, jobs, kb, healthz) and a few dozen
derandomized examples each, so that it runs in about a minute on 2 cores and the same way every
time. Ask, draw and chat run models for seconds per call and are covered by tests/test_serve.py;
uploads and deletes would change the KB under the other examples.

The server under test has no API keys (open on 127.0.0.1), so the schema's bearer requirement is
dropped for this run (else a request without a key, which the open server rightly accepts, would
count as invalid data accepted); tests/test_serve.py covers auth.

Each operation's cases come from schemathesis's hypothesis strategy (``as_strategy``) rather than
``schemathesis.pytest.from_fixture``, whose lazy loader reads a pytest attribute (``_nodeid``)
that pytest 9 no longer has.
"""

from __future__ import annotations

import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette", "httpx", "schemathesis"):  # the dev extra
    pytest.importorskip(_module, reason='needs the serve and dev extras: pip install "mmrag[dev]"')

import httpx  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from mmrag.pipelines.serve.app import create_app  # noqa: E402
from tests.serve_fixtures import build_kb, live_server, tiny_config  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# (method, path, whether invalid requests exist: not for no parameters, nor for one free string in the path)
OPERATIONS = [("GET", "/healthz", False), ("GET", "/v1/kb", False), ("POST", "/v1/search", True),
              ("GET", "/v1/records", True), ("GET", "/v1/records/{record_id}", False),
              ("GET", "/v1/records/{record_id}/image", False), ("GET", "/v1/jobs/{job_id}", False)]
CASES = [pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
         for method, path, has_invalid in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if has_invalid or mode is GenerationMode.POSITIVE]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_models_dir, tiny_clip):
    """A server with no API keys on 127.0.0.1 (open), over its own six-record KB."""
    kb_path = build_kb(tmp_path_factory.mktemp("serve-schema") / "kb", tiny_clip)
    app = create_app(tiny_config(tiny_models_dir, kb_path), kb_path=kb_path, max_upload_bytes=2**20)
    with live_server(app) as url:
        document = httpx.get(f"{url}/openapi.json").json()
        for operations in document["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
        yield schemathesis.openapi.from_dict(document), url


@pytest.mark.parametrize("method, path, mode", CASES)
def test_cheap_endpoints_conform_to_their_schema(api_schema, method, path, mode):
    schema, url = api_schema
    operation = schema[path][method]
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def check(case):
        case.call_and_validate(base_url=url, checks=checks, timeout=120)

    check()
