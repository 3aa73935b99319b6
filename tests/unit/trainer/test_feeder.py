"""The cadence rule as the feeder applies it: version tags, block release, in-flight bound, task mixing."""

from __future__ import annotations

import pytest

from cadence.config import RunConfig, TaskConfig
from cadence.tasks import Problem, load_problems
from cadence.trainer.feeder import PromptPlan, step_quotas


def run_config(**fields: object) -> RunConfig:
    return RunConfig.model_validate({"batch_prompts": 4, "steps": 8} | fields)


def test_quotas_follow_weights_and_sum_to_the_batch() -> None:
    """Weights 3:1 over 4 prompts → 3 + 1; 1:1 over 3 → the odd prompt alternates between tasks."""
    assert step_quotas([3, 1], 4, step=0) == [3, 1]
    assert step_quotas([1, 1], 3, step=0) == [2, 1]
    assert step_quotas([1, 1], 3, step=1) == [1, 2]
    assert all(sum(step_quotas([0.2, 0.5, 0.3], 7, t)) == 7 for t in range(10))


def test_plan_is_a_pure_function_of_seed_and_step() -> None:
    config = run_config(sync_every=2, tasks=[{"name": "toy", "limit": 10}])
    problems = [load_problems(config.tasks[0])]
    first, second = PromptPlan(config, problems, "r"), PromptPlan(config, problems, "r")
    assert [p.prompt_id for p in first.prompts_for(3)] == [p.prompt_id for p in second.prompts_for(3)]
    prompts = first.prompts_for(3)
    assert len(prompts) == 4 and {p.step for p in prompts} == {3} and {p.min_version for p in prompts} == {2}
    assert {p.max_version for p in prompts} == {2}
    lagged = PromptPlan(run_config(sync_every=2, async_lag=1, tasks=[{"name": "toy", "limit": 10}]), problems, "r")
    assert {(p.min_version, p.max_version) for p in lagged.prompts_for(5)} == {(2, 4)}
    assert prompts[0].sampling.n == config.sampling.n and prompts[0].task == "math" and prompts[0].reference
    # 10 problems, 4 per step: steps 0–1 and half of step 2 make the first epoch, each problem once.
    seen = [p.prompt_id.split(":", 1)[1] for t in range(3) for p in first.prompts_for(t)][:10]
    assert len(set(seen)) == 10


def test_prompts_do_not_depend_on_which_steps_were_asked_before() -> None:
    """Epoch shuffles are kept while in use; a plan asked in any order (a restart, a replay) gives the same
    prompts, across epoch boundaries (10 problems, 4 per step: a new epoch every 2.5 steps)."""
    config = run_config(sync_every=2, tasks=[{"name": "toy", "limit": 10}])
    problems = [load_problems(config.tasks[0])]
    forward, backward = PromptPlan(config, problems, "r"), PromptPlan(config, problems, "r")
    ids_forward = {t: [p.prompt_id for p in forward.prompts_for(t)] for t in range(12)}
    ids_backward = {t: [p.prompt_id for p in backward.prompts_for(t)] for t in reversed(range(12))}
    assert ids_forward == ids_backward


def test_mixed_tasks_are_drawn_by_weight_and_tagged_with_their_kind() -> None:
    math = [Problem(f"m{i}", "math", f"What is {i}+0?", str(i)) for i in range(5)]
    chat = [Problem(f"c{i}", "chat", f"Say hi #{i}") for i in range(5)]
    tasks = [TaskConfig(name="m", weight=3), TaskConfig(name="c", kind="chat", weight=1)]
    config = run_config(tasks=tasks, reward_model="tiny-rm")
    prompts = PromptPlan(config, [math, chat], "r").prompts_for(0)
    assert [p.task for p in prompts] == ["math", "math", "math", "chat"]
    assert prompts[3].reference == ""
    # every prompt goes out as chat messages (a user turn); the engine applies the model's template
    assert [(m.role, m.content) for m in prompts[3].messages] == [("user", prompts[3].text)]


def test_overlong_prompts_are_refused() -> None:
    config = run_config(model={"max_prompt_tokens": 12})
    problems = [Problem("short", "math", "What is 1+1?", "2"), Problem("long", "math", "x" * 40, "1")]
    plan = PromptPlan(config, [problems], "r", token_count=lambda p: len(p.text))
    assert {p.prompt_id.split(":", 1)[1] for p in plan.prompts_for(0)} == {"short"}
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptPlan(config, [problems[1:]], "r", token_count=lambda p: len(p.text))
