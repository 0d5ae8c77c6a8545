"""The continuous-batching engine: joined sequences decode as if alone; cancelled ones free their slot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from workers.batch_engine import BatchEngine, SamplingSpec, SequenceRequest, TokenInfo, wait_idle
from workers.runtime import ModelRuntime

PROMPTS = ["Write a short poem", "Explain how photosynthesis works in simple terms please", "Hi", "Describe the water cycle. What is"]


class Collect:
    def __init__(self) -> None:
        self.text, self.tokens, self.done = "", [], threading.Event()
        self.reason, self.num_tokens, self.error = None, 0, None

    def on_token(self, piece: str, token: TokenInfo | None) -> None:
        self.text += piece
        if token is not None:
            self.tokens.append(token)

    def on_finish(self, reason: str, num_tokens: int) -> None:
        self.reason, self.num_tokens = reason, num_tokens
        self.done.set()

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(str(tiny_model_dir), device="cpu")


def _submit(engine: BatchEngine, runtime: ModelRuntime, prompt: str, **spec) -> Collect:  # type: ignore[no-untyped-def]
    listener = Collect()
    listener.request = SequenceRequest(runtime.context_ids(prompt), SamplingSpec(**{"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, **spec}), listener)
    engine.submit(listener.request)
    return listener


def test_sequences_joining_a_running_batch_decode_exactly_as_alone(runtime: ModelRuntime) -> None:
    alone = [samples[0] for samples in runtime.generate(PROMPTS, max_new_tokens=16, temperature=0)]
    engine = BatchEngine(runtime, max_batch_size=8).start()
    # The first sequence is decoding (it has emitted a token) before the others are submitted, so
    # they join a running batch; a fixed sleep instead raced the tiny model's decode speed.
    first = _submit(engine, runtime, PROMPTS[0])
    deadline = time.monotonic() + 60
    while not first.tokens and not first.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert first.tokens and not first.done.is_set(), "the first sequence must still be decoding when the others join"
    listeners = [first, *(_submit(engine, runtime, prompt) for prompt in PROMPTS[1:])]
    assert all(listener.done.wait(60) for listener in listeners)
    assert [listener.text for listener in listeners] == [g.text for g in alone]
    assert [listener.num_tokens for listener in listeners] == [g.num_tokens for g in alone]
    assert max(engine.step_log) > 1, "the sequences never shared a decode step"
    engine.retire()


def test_a_cancelled_sequence_leaves_the_batch_and_frees_its_slot(runtime: ModelRuntime) -> None:
    engine = BatchEngine(runtime, max_batch_size=1).start()
    long = _submit(engine, runtime, PROMPTS[0], max_tokens=10_000)
    deadline = time.monotonic() + 30
    while not long.tokens and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = _submit(engine, runtime, PROMPTS[1], max_tokens=3)
    time.sleep(0.1)
    assert not queued.done.is_set(), "the only slot is taken, so the second sequence must wait"
    assert engine.running == 1 and engine.waiting == 1
    long.request.cancel()  # what a client disconnect does
    assert queued.done.wait(30) and queued.reason == "length" and queued.num_tokens == 3
    assert not long.done.is_set() and engine.stats["cancelled"] == 1
    assert wait_idle(engine)
    engine.retire()


def test_admit_min_makes_waiting_sequences_join_in_groups(runtime: ModelRuntime) -> None:
    def steps(admit_min: int) -> tuple[list[int], list[str]]:
        engine = BatchEngine(runtime, max_batch_size=4, admit_min=admit_min)
        # Submitted before the thread starts, so the first admission takes the first four.
        listeners = [_submit(engine, runtime, PROMPTS[i % 4], max_tokens=n) for i, n in enumerate([2, 3, 8, 8, 8, 8])]
        engine.start()
        assert all(listener.done.wait(60) for listener in listeners)
        engine.retire()
        engine.join(30)
        assert not engine.alive
        return list(engine.step_log), [listener.text for listener in listeners]

    at_once, texts = steps(1)
    grouped, grouped_texts = steps(2)
    # Step 1 ends the 2-token sequence: with admit_min 1 a waiting one joins, with 2 the batch
    # runs one step short until the 3-token one also ends, then both waiting ones join together.
    assert at_once[:3] == [4, 4, 4]
    assert grouped[:3] == [4, 3, 4]
    assert grouped_texts == texts, "when a sequence joins never changes what it decodes"


def test_stop_strings_match_generated_text_only(runtime: ModelRuntime) -> None:
    prompt = PROMPTS[3]
    plain = runtime.generate([prompt], max_new_tokens=12, temperature=0)[0][0]
    # A stop string that straddles the prompt/output boundary (and is not inside the output) must not stop.
    across = next(prompt[-k:] + plain.text[:2] for k in range(1, len(prompt)) if prompt[-k:] + plain.text[:2] not in plain.text)
    inside = plain.text[4:7]
    engine = BatchEngine(runtime).start()
    a = _submit(engine, runtime, prompt, max_tokens=12, stops=(across,))
    b = _submit(engine, runtime, prompt, max_tokens=12, stops=(inside,))
    assert a.done.wait(30) and b.done.wait(30)
    assert (a.text, a.reason) == (plain.text, "length")
    assert b.text == plain.text[: plain.text.find(inside)] and b.reason == "stop"
    # runtime.generate (the loop's path) follows the same rule.
    assert runtime.generate([prompt], max_new_tokens=12, temperature=0, stop_strings=[across])[0][0] == plain
    engine.retire()


def test_logprobs_are_the_models_own_and_sorted(runtime: ModelRuntime) -> None:
    engine = BatchEngine(runtime).start()
    listener = _submit(engine, runtime, PROMPTS[0], max_tokens=6, logprobs=3)
    assert listener.done.wait(30)
    engine.retire()
    prompt_ids, ids = runtime.context_ids(PROMPTS[0]), [t.token_id for t in listener.tokens]
    with torch.no_grad():  # teacher-forced: the same tokens scored in one unbatched, uncached pass
        logprobs = runtime.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float().log_softmax(-1)
    expected = [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(ids)]
    assert [t.logprob for t in listener.tokens] == pytest.approx(expected, abs=1e-4)
    for token in listener.tokens:
        values = [lp for _, lp in token.top]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert token.top[0][0] == token.token_id  # greedy: the chosen token is the most probable
