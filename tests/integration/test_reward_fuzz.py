"""Property-based fuzzing of the reward HTTP API from its own OpenAPI schema.

schemathesis generates bodies for every operation from the schema the app serves; the app is the real
FastAPI app over the real verifier pool and a real tiny reward model, served in-process over ASGI. Any input
gives no 5xx; input the schema allows (positive generation) is never rejected (no 4xx), because the schema
states the limits the scorer enforces. The one rule JSON Schema cannot state (one `prompts`/`labels` entry
per `query` on /get_reward, said in the descriptions) is kept out of the positive cases.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, settings
from schemathesis import GenerationMode

from cadence.models.tiny import save_untrained_rm
from cadence.reward.http import create_app
from cadence.reward.reward_model import RewardModel
from cadence.reward.scoring import Limits, Scorer
from cadence.reward.verifier import MathVerifier

LIMITS = Limits(max_items=4, max_prompt_chars=200, max_response_chars=300, max_reference_chars=40)
RM_DIR = tempfile.TemporaryDirectory(prefix="cadence-fuzz-rm-")
# The schema is read at import, so the app is built here; the verifier pool starts with the module's tests.
SCORER = Scorer(None, RewardModel(str(save_untrained_rm(Path(RM_DIR.name))), device="cpu"), LIMITS)
APP = create_app(SCORER)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
valid_only = schemathesis.openapi.from_asgi("/openapi.json", APP)
valid_only.config.generation.update(modes=[GenerationMode.POSITIVE])


@pytest.fixture(scope="module", autouse=True)
def verifier_pool() -> Iterator[None]:
    SCORER.verifier = MathVerifier(processes=1, item_timeout=2.0)
    assert SCORER.verifier.wait_ready()
    yield
    SCORER.verifier.close()


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def _lengths_agree(body: object) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("query"), list):
        return True
    count = len(body["query"])
    return all(not isinstance(body.get(name), list) or len(body[name]) == count for name in ("prompts", "labels"))


@schema.parametrize()
@FUZZ
def test_no_input_gives_a_server_error(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.body, response.status_code, response.text[:300])


@valid_only.include(method="POST").parametrize()
@FUZZ
def test_schema_valid_input_is_never_rejected(case: schemathesis.Case) -> None:
    assume(_lengths_agree(case.body))
    response = case.call()
    assert response.status_code < 400, (case.body, response.status_code, response.text[:300])
