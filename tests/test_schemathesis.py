"""Property-based fuzzing of the API's own OpenAPI document: no generated input gives a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import Stack


def invalid_http(headers: dict[str, str] | None) -> bool:
    """Control characters in a header make the request invalid HTTP/1.1: the HTTP parser
    answers 400 in plain text before any application code runs."""
    return any(ord(c) < 32 or ord(c) == 127 for v in (headers or {}).values() for c in v)


schema = schemathesis.from_pytest_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_schema(module_stack: Stack):
    return schemathesis.from_uri(module_stack.api_url + "/openapi.json", force_schema_version="30")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_5xx_for_any_generated_input(case, module_stack: Stack) -> None:
    for authorized in (True, False):
        headers = {"authorization": f"Bearer {module_stack.admin_token}"} if authorized else {}
        response = case.call(headers=headers, timeout=10)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        )
        if response.status_code >= 400 and not invalid_http(case.headers):
            assert response.headers.get("content-type") == "application/json", (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]!r} headers={case.headers!r} body={case.body!r}"
            )
            assert set(response.json()) == {"error", "message"}, response.text
