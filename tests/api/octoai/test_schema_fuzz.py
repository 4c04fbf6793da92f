"""Schemathesis against the app's own OpenAPI schema: no 5xx, and every response matches the schema."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks

# Cheap but real generations: the tiny model, one step, one 512x512 image. Out-of-range values are
# left alone so validation is still exercised.
CAPS = {"steps": 1, "num_images": 1}


def map_body(context, body):
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field, cap in CAPS.items():
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap and value <= 200:
            body[field] = cap
    if "width" not in body and "height" not in body:
        body["width"] = body["height"] = 512
    return body


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
EXAMPLES_PER_OPERATION = 15


@pytest.mark.timeout(180)
def test_api_never_errors_and_matches_its_schema(server_factory):
    # Schemathesis' lazy pytest fixtures do not work with this pytest, so drive each operation's
    # Hypothesis strategy directly.
    with server_factory(warmup=False, request_timeout=0, max_queue=64) as live:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        schema.hook(map_body)
        operations = [result.ok() for result in schema.get_all_operations()]
        seen: Counter = Counter()
        assert any(op.path == "/generate/flux-dev" for op in operations)
        for operation in operations:

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            @given(case=operation.as_strategy())
            def call(case):
                response = case.call_and_validate(timeout=60, checks=CHECKS)
                seen[(case.method, case.path, response.status_code)] += 1

            call()
        generated = sum(n for (method, path, status), n in seen.items() if status == 200 and method == "POST")
        assert generated >= 1, dict(seen)
