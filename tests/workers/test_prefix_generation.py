"""The batch engine prefills a prompt that opens like a recent one (a URIAL preamble) on a copy of
that opening's keys and values: greedy answers are token for token the ones of a whole prefill."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest

from workers import prefix_cache
from workers.batch_engine import BatchEngine, SamplingSpec, SequenceRequest, TokenInfo
from workers.runtime import ModelRuntime
from workers.tiny_model import ARCHITECTURES, build_tiny_model

OPENING = "Answer the question helpfully and honestly. Be concise, accurate and polite.\n\nQuestion: "
QUERIES = ["hi", "Write a short poem about the sea.", "Name a colour.", "What is a tuple in Python?", "Count to five."]


class Collect:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def on_token(self, piece: str, token: TokenInfo | None) -> None:
        if token is not None:
            self.ids.append(token.token_id)

    def on_finish(self, reason: str, num_tokens: int) -> None:
        self.done.set()

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runtime(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    # A base model (no chat template) renders chats as URIAL prompts: ~1,600 shared preamble tokens.
    # Untied and scaled, a random model's greedy choices are far from ties (see test_prefix_cache).
    path = build_tiny_model(
        tmp_path_factory.mktemp(request.param) / "base", arch=request.param, chat_template=None, tie_embeddings=False, output_scale=6.0,
    )
    loaded = ModelRuntime.load(str(path), device="cpu")
    assert loaded.profile.prompt_format == "urial"
    return loaded


@pytest.fixture
def prefilled_tokens(runtime: ModelRuntime):  # type: ignore[no-untyped-def]
    """Every forward pass's input token count (prompt prefills and decode steps)."""
    counts: list[int] = []
    handle = runtime.model.register_forward_pre_hook(lambda _m, _a, kwargs: counts.append(kwargs["input_ids"].numel()), with_kwargs=True)
    yield counts
    handle.remove()


def _urial_prompts(runtime: ModelRuntime) -> list[list[int]]:
    return [runtime.context_ids(runtime.render_chat([{"role": "user", "content": q}])) for q in QUERIES]


def _opening_prompts(runtime: ModelRuntime) -> list[list[int]]:
    """Prompts that end in their own words, so a random model's answers differ between them (after
    a URIAL prompt's common ending they all say the same)."""
    return [runtime.context_ids(OPENING + q) for q in QUERIES]


def _decode(runtime: ModelRuntime, prompts: list[list[int]], *, share_prefix: bool, one_by_one: bool, max_batch_size: int = 8) -> tuple[list[list[int]], BatchEngine]:
    """Greedy ids per prompt; ``one_by_one`` submits each after the previous one finished (a server's
    requests arriving apart), else all before the engine starts (one admission)."""
    engine = BatchEngine(runtime, max_batch_size=max_batch_size, share_prefix=share_prefix)
    listeners = []
    for ids in prompts:
        listener = Collect()
        engine.submit(SequenceRequest(list(ids), SamplingSpec(max_tokens=12, temperature=0.0, top_p=1.0), listener))
        listeners.append(listener)
        if one_by_one:
            if engine._thread is None:  # noqa: SLF001 - start on the first request, as the server does
                engine.start()
            assert listener.done.wait(600)
    if not one_by_one:
        engine.start()
    assert all(listener.done.wait(600) for listener in listeners)
    assert all(listener.error is None for listener in listeners)
    engine.retire()
    engine.join(60)
    return [listener.ids for listener in listeners], engine


@pytest.mark.parametrize("prompts_of", [_urial_prompts, _opening_prompts], ids=["urial", "opening"])
def test_requests_arriving_apart_prefill_on_the_remembered_opening(runtime: ModelRuntime, prefilled_tokens: list[int], prompts_of) -> None:  # type: ignore[no-untyped-def]
    prompts = prompts_of(runtime)
    preamble = prefix_cache.common_prefix_length(prompts)
    assert preamble >= prefix_cache.MIN_SHARED_PREFIX

    shared, engine = _decode(runtime, prompts, share_prefix=True, one_by_one=True)
    shared_tokens = sum(prefilled_tokens)
    prefilled_tokens.clear()
    unshared, reference = _decode(runtime, prompts, share_prefix=False, one_by_one=True)

    assert shared == unshared and all(len(ids) > 0 for ids in shared)
    if prompts_of is _opening_prompts:  # equal answers must not hide ignored suffixes
        assert len({tuple(ids) for ids in shared}) > 1
    assert engine.prefixes is not None and engine.prefixes.hits == len(prompts) - 1 and reference.prefixes is None
    # Every request after the first skipped the preamble.
    assert sum(prefilled_tokens) - shared_tokens >= (len(prompts) - 1) * preamble


def test_one_admission_encodes_the_shared_opening_once(runtime: ModelRuntime, prefilled_tokens: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    original = prefix_cache.encode_prefix
    monkeypatch.setattr(prefix_cache, "encode_prefix", lambda model, ids, *rest: encoded.append(len(ids)) or original(model, ids, *rest))
    prompts = _opening_prompts(runtime)

    # Two slots: three prompts wait and join as rows finish, on the remembered opening.
    shared, engine = _decode(runtime, prompts, share_prefix=True, one_by_one=False, max_batch_size=2)
    assert encoded == [prefix_cache.shared_prefix_length(prompts[:2])]
    assert engine.prefixes is not None and engine.prefixes.hits >= 1
    unshared, _ = _decode(runtime, prompts, share_prefix=False, one_by_one=False, max_batch_size=2)
    assert shared == unshared and len({tuple(ids) for ids in shared}) > 1


def test_generate_on_the_continuous_scheduler_matches_the_static_path(runtime: ModelRuntime) -> None:
    prompts = [OPENING + q for q in QUERIES] + [runtime.render_chat([{"role": "user", "content": q}]) for q in QUERIES[:2]]
    static = runtime.generate(prompts, max_new_tokens=12, temperature=0, batch_size=2)
    continuous = runtime.generate(prompts, max_new_tokens=12, temperature=0, batch_size=2, scheduler="continuous")
    assert [(g[0].text, g[0].num_tokens) for g in continuous] == [(g[0].text, g[0].num_tokens) for g in static]


def test_prompts_without_a_long_shared_opening_are_prefilled_whole(runtime: ModelRuntime) -> None:
    prompts = [runtime.context_ids(text) for text in ("Score:", "A different opening entirely.", "Hi")]
    shared, engine = _decode(runtime, prompts, share_prefix=True, one_by_one=True)
    unshared, _ = _decode(runtime, prompts, share_prefix=False, one_by_one=True)
    assert shared == unshared
    assert engine.prefixes is not None and engine.prefixes.hits == 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_static_generate_decodes_each_chunk_on_the_prefilled_opening(runtime: ModelRuntime, prefilled_tokens: list[int], batch_size: int) -> None:
    prompts = [OPENING + q for q in QUERIES] + [runtime.render_chat([{"role": "user", "content": q}]) for q in QUERIES[:2]]
    unshared = runtime.generate(prompts, max_new_tokens=12, temperature=0, batch_size=batch_size, share_prefix=False)
    whole = sum(prefilled_tokens)
    prefilled_tokens.clear()
    shared = runtime.generate(prompts, max_new_tokens=12, temperature=0, batch_size=batch_size)
    # Ragged suffixes, chunks of 1 to all rows: the same answers, token for token.
    assert [(g[0].text, g[0].num_tokens, g[0].finished) for g in shared] == [(g[0].text, g[0].num_tokens, g[0].finished) for g in unshared]
    assert len({g[0].text for g in shared}) > 2
    # Prompts of both kinds share only their first few tokens: short of MIN_SHARED_PREFIX, so this
    # call prefills whole; without the URIAL prompts, the OPENING is shared.
    assert prefix_cache.shared_prefix_length([runtime.context_ids(p) for p in prompts]) < prefix_cache.MIN_SHARED_PREFIX
    assert sum(prefilled_tokens) == whole
    prefilled_tokens.clear()
    opening_only = prompts[: len(QUERIES)]
    shared = runtime.generate(opening_only, max_new_tokens=12, temperature=0, batch_size=batch_size)
    reused = sum(prefilled_tokens)
    prefilled_tokens.clear()
    unshared = runtime.generate(opening_only, max_new_tokens=12, temperature=0, batch_size=batch_size, share_prefix=False)
    assert [(g[0].text, g[0].num_tokens) for g in shared] == [(g[0].text, g[0].num_tokens) for g in unshared]
    opening = prefix_cache.shared_prefix_length([runtime.context_ids(p) for p in opening_only])
    # One prefill of the opening for the call instead of one per row.
    assert sum(prefilled_tokens) - reused == len(opening_only) * opening - opening


def test_static_generate_reuses_the_urial_preamble_with_samples(runtime: ModelRuntime, prefilled_tokens: list[int]) -> None:
    prompts = [runtime.render_chat([{"role": "user", "content": q}]) for q in QUERIES[:3]]
    shared = runtime.generate(prompts, num_samples=2, max_new_tokens=8, temperature=0.8, seed=3, batch_size=4)
    reused = sum(prefilled_tokens)
    prefilled_tokens.clear()
    unshared = runtime.generate(prompts, num_samples=2, max_new_tokens=8, temperature=0.8, seed=3, batch_size=4, share_prefix=False)
    assert [[g.text for g in s] for s in shared] == [[g.text for g in s] for s in unshared]
    assert sum(prefilled_tokens) - reused > 3 * 1000  # five of the six rows skip the ~1,600-token preamble


def test_the_memory_reuses_a_remembered_opening_or_encodes_a_longer_shared_one(runtime: ModelRuntime) -> None:
    argument = prefix_cache.cache_argument(set(inspect.signature(runtime.model.forward).parameters))
    assert argument is not None
    memory = prefix_cache.PrefixMemory(runtime.model, runtime.device, argument)
    prompts = _opening_prompts(runtime)
    opening = prefix_cache.common_prefix_length(prompts)
    samples = [prompts[0]] * 3  # one prompt's samples: all of it is shared
    prefix = memory.prefix_for(samples)
    assert prefix is not None and prefix.length == len(prompts[0]) - 1 and memory.hits == 0
    # Another question after the same opening reuses the remembered prompt, cut where they part.
    for group in ([prompts[1]], [prompts[2]] * 2):
        prefix = memory.prefix_for(group)
        assert prefix is not None and prefix.length == prefix_cache.common_prefix_length([prompts[0], group[0]]) >= opening
    assert memory.hits == 2
    # Four samples of a long question: encoding all they share saves more than the opening alone.
    long = runtime.context_ids(OPENING + "Explain how photosynthesis works in simple terms, then describe the water cycle in detail.")
    prefix = memory.prefix_for([long] * 4)
    assert prefix is not None and prefix.length == len(long) - 1 and memory.hits == 2
    assert memory.prefix_for([runtime.context_ids("Nothing alike, none at all, not a single shared token here.")]) is None
