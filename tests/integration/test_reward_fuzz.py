"""Property-based fuzzing of the reward HTTP API from its own OpenAPI schema: no input gives a 5xx.

schemathesis generates valid and invalid bodies for every operation; the app is the real FastAPI app over
the real verifier pool (attached once the module's fixture starts it), served in-process over ASGI.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cadence.reward.http import create_app
from cadence.reward.scoring import Scorer
from cadence.reward.verifier import MathVerifier

SCORER = Scorer(verifier=None)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SCORER))


@pytest.fixture(scope="module", autouse=True)
def verifier_pool() -> Iterator[None]:
    SCORER.verifier = MathVerifier(processes=1, item_timeout=2.0)
    assert SCORER.verifier.wait_ready()
    yield
    SCORER.verifier.close()


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.body, response.status_code, response.text[:300])
