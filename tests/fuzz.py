"""Property-based fuzzing of the service from its own OpenAPI schema (schemathesis, in process
over ASGI), shared by ``tests/test_serving.py`` (the recommendation endpoints on a synthetic
deployment) and ``tests/test_search_e2e.py`` (the whole app with a real search champion).

Every generated request, valid or not (schemathesis' positive and negative modes), must get an
answer that is not a 5xx, documented in the schema, and, when it is a 4xx, a JSON ``detail``
a person can read. Bounded and seeded: ``MAX_EXAMPLES`` cases per operation, derandomized.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

MAX_EXAMPLES = 60
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # the first call of an operation loads lazily; latency is not tested here
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def readable_4xx(ctx: Any, response: Any, case: Any) -> None:
    """A 4xx says what was wrong: JSON ``{"detail": "..."}`` or ``{"detail": ["...", ...]}``,
    each line non-empty text (never an empty body, HTML or a Python repr of an object)."""
    if not 400 <= response.status_code < 500:
        return None
    detail = response.json().get("detail")
    lines = detail if isinstance(detail, list) else [detail]
    assert lines and all(isinstance(x, str) and x.strip() for x in lines), (
        f"{response.status_code} without a readable detail: {response.text[:300]}"
    )
    return None


def schema_of(app: Any) -> Any:
    """The app's OpenAPI schema as schemathesis reads it (the app must have started: its
    lifespan loads the models)."""
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_case(case: Any, counts: dict[str, int]) -> None:
    """Send one generated case and validate the answer; count cases and status codes."""
    response = case.call()
    counts["cases"] = counts.get("cases", 0) + 1
    key = f"{case.operation.label} {response.status_code}"
    counts[key] = counts.get(key, 0) + 1
    case.validate_response(response, additional_checks=[readable_4xx])


def fuzz(app: Any, paths: set[str] | None = None, skip: set[str] = frozenset()) -> dict[str, int]:
    """Fuzz each operation of ``app`` (those on ``paths``, or all but ``skip``), valid and
    invalid inputs; the counts of cases and of status codes per operation.

    Hypothesis drives schemathesis' strategies directly (``@given`` per operation) rather than
    through ``schema.parametrize``: its fixture-based parametrization reads a pytest node
    attribute that pytest 9 removed."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    counts: dict[str, int] = {}
    for result in schema_of(app).get_all_operations():
        operation = result.ok()
        path = operation.path
        if (paths is not None and path not in paths) or path in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                check_case(case, counts)

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (an operation without parameters)
                assert mode is GenerationMode.NEGATIVE, operation.label
    return counts
