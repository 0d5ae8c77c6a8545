"""The openai judge against a real `kaizen serve` on loopback: it judges a cycle's answers, a
stopped server fails the judge stage with a clear error and loses nothing, and after a restart
the resumed cycle judges through it again."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import structlog
import structlog.testing
from sqlalchemy import func, select

from daemon.bootstrap import initialise
from daemon.config import MASK
from daemon.cycle import CycleError, run_cycle
from daemon.db.models import Judgment, Prompt, Response, StageRun, StageStatus
from daemon.dispatch import EagerDispatcher
from policies import rubric
from tests.factories import small_cycle_settings
from tests.serving.harness import Server, free_port
from workers.judges import JudgeUnavailable, build_judge
from workers.judges.openai import SCORE_LABELS, VERDICT_LABELS, distribution_after_cue

pytestmark = pytest.mark.slow


def _settings(tmp_path: Path, tiny_model_dir: Path, port: int, **openai_settings):  # type: ignore[no-untyped-def]
    return small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        judge={
            "backend": "openai", "temperature": 0.0, "max_new_tokens": 16,
            "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1, "backoff_seconds": 0.05, "timeout_seconds": 30, **openai_settings},
        },
        serve={"port": port, "poll_seconds": 0.1, "max_new_tokens": 32},
    )


def _count(session, model) -> int:  # type: ignore[no-untyped-def]
    return session.scalar(select(func.count()).select_from(model))


def test_the_openai_judge_survives_its_server_being_stopped(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path, tiny_model_dir, port)
    sessions = initialise(settings)

    # Server down: the judge stage fails with an error that names the endpoint; nothing is lost.
    with pytest.raises(CycleError, match="judge"):
        run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        judge_run = session.scalars(select(StageRun).where(StageRun.stage == "judge")).one()
        assert judge_run.status == StageStatus.failed
        assert f"judge endpoint http://127.0.0.1:{port}/v1/chat/completions unreachable after 2 attempts" in judge_run.error
        assert "judge.openai.base_url" in judge_run.error
        responses, prompts = _count(session, Response), _count(session, Prompt)
        assert responses > 0 and _count(session, Judgment) == 0

    with Server(settings):
        report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
        with sessions() as session:
            assert _count(session, Response) == responses and _count(session, Prompt) == prompts  # resumed, not redone
            judgments = list(session.scalars(select(Judgment).order_by(Judgment.id)))
            first = session.scalars(select(Response).where(Response.id == judgments[0].response_id)).one()
            question = session.scalars(select(Prompt.text).where(Prompt.id == first.prompt_id)).one()
            result = session.scalars(select(StageRun.result).where(StageRun.stage == "judge", StageRun.iteration_id == report.iteration_id)).one()
        assert result["judge"] == "openai:kaizen"
        assert {j.judge for j in judgments} == {"openai:kaizen"}
        assert all((j.score is None) == (j.parse_error is not None) for j in judgments)
        # The stored judgment is what the server answers to the rubric prompt (greedy decoding).
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        direct = client.chat.completions.create(
            model="kaizen", messages=[{"role": "user", "content": rubric.render_judge_prompt(question, first.text)}],
            max_tokens=16, temperature=0.0,
        )
        assert judgments[0].raw_output == direct.choices[0].message.content

    # Stopped again: a direct call fails the same clear way.
    judge = build_judge(settings, "train", policy_path=str(tiny_model_dir), load_model=lambda path: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(JudgeUnavailable, match="unreachable after 2 attempts"):
        judge.score([("Name a colour.", "blue")])


def test_a_missing_api_key_variable_is_named(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIZEN_TEST_JUDGE_KEY", raising=False)
    settings = _settings(tmp_path, tiny_model_dir, free_port(), api_key_env="KAIZEN_TEST_JUDGE_KEY")
    judge = build_judge(settings, "gate", policy_path=str(tiny_model_dir), load_model=lambda path: None, backends=["openai"])  # type: ignore[arg-type,return-value]
    with pytest.raises(JudgeUnavailable, match="KAIZEN_TEST_JUDGE_KEY, which is not set"):
        judge.compare([("Name a colour.", "blue", "red")])


def test_credentials_in_the_judge_url_appear_in_no_message_or_log_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path, tiny_model_dir, port, base_url=f"http://judge:s3cret-pw@127.0.0.1:{port}/v1")
    judge = build_judge(settings, "train", policy_path=str(tiny_model_dir), load_model=lambda path: None)  # type: ignore[arg-type,return-value]
    with structlog.testing.capture_logs() as logs, pytest.raises(JudgeUnavailable) as caught:
        judge.score([("Name a colour.", "blue")])
    assert f"judge endpoint http://judge:{MASK}@127.0.0.1:{port}/v1/chat/completions unreachable after 2 attempts" in str(caught.value)
    retries = [line for line in logs if line["event"] == "judge.openai_retry"]
    assert retries and "s3cret-pw" not in repr(logs)


def test_scores_and_verdicts_are_read_from_top_logprobs_when_the_server_sends_them() -> None:
    def token(text: str, alternatives: dict[str, float] | None = None) -> dict:
        return {"token": text, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in (alternatives or {}).items()]}

    reply = [token("Fine"), token("."), token(" Score"), token(":"), token(" 4", {" 4": 0.6, " 5": 0.2, " x": 0.2}), token("\n")]
    assert distribution_after_cue(reply, rubric.SCORE_CUE, SCORE_LABELS) == pytest.approx([0, 0, 0, 0.75, 0.25])
    verdict = [token("Winner"), token(":"), token(" "), token("B", {"B": 0.5, "A": 0.25, "tie": 0.25})]
    assert distribution_after_cue(verdict, rubric.VERDICT_CUE, VERDICT_LABELS) == pytest.approx([0.25, 0.5, 0.25])
    assert distribution_after_cue([token("no cue here")], rubric.SCORE_CUE, SCORE_LABELS) is None
