"""The serving state behind the routes: the champion, one batch engine per loaded model, steering,
and turning requests into engine sequences and engine events into choices.

Requests never decode in the request's thread: every choice is a sequence submitted to the
engine of the model it started with (a hot swap retires the old engine once its sequences end),
and its tokens come back through an asyncio queue. A client that goes away cancels its sequences:
the engine drops them at its next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import Request

from daemon.config import Settings
from daemon.serving import sequences as seqs
from daemon.serving.champion import ChampionWatcher, ServedModel
from daemon.serving.protocol import ApiError, DecodeParams, Limits, SamplingRequest
from daemon.serving.responses import ChoiceResult, Envelope
from policies.model_profile import ContextLengthExceeded, check_context
from policies.steering import SteeringError, SteeringSpec
from workers.batch_engine import SequenceEngine, SequenceRequest, TokenInfo
from workers.engine_thread import QueueFullError
from workers.steering import Decoder, SteeringMethods

log = structlog.get_logger(__name__)

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Prompt:
    text: str  # what echo repeats
    ids: list[int]


@dataclass(frozen=True)
class Job:
    model: ServedModel
    spec: SteeringSpec
    params: DecodeParams
    prompts: list[Prompt]
    decoder: Decoder
    envelope: Envelope

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)


@dataclass(frozen=True)
class Event:
    kind: str  # "token" | "finish" | "error"
    index: int
    piece: str = ""
    token: TokenInfo | None = None
    reason: str = ""
    num_tokens: int = 0
    error: BaseException | None = None


class _Channel:
    """A sequence listener that hands engine-thread events to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event], index: int) -> None:
        self.loop, self.queue, self.index = loop, queue, index

    def _put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client and its request are gone
            pass

    def on_token(self, piece: str, token: TokenInfo | None) -> None:
        self._put(Event("token", self.index, piece=piece, token=token))

    def on_finish(self, reason: str, num_tokens: int) -> None:
        self._put(Event("finish", self.index, reason=reason, num_tokens=num_tokens))

    def on_error(self, error: BaseException) -> None:
        self._put(Event("error", self.index, error=error))


class Serving:
    def __init__(self, settings: Settings, watcher: ChampionWatcher, methods: SteeringMethods) -> None:
        self.settings, self.watcher, self.methods = settings, watcher, methods
        self.serve = settings.serve
        self.limits = Limits(self.serve.max_new_tokens, settings.generation.temperature, settings.generation.top_p)
        self._engines: dict[int, SequenceEngine] = {}
        self._engines_lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def served(self) -> ServedModel:
        current = self.watcher.current
        if current is None:
            failure = self.watcher.last_failure
            detail = f": {failure.error}" if failure else ""
            raise ApiError(503, f"no model loaded yet{detail}", kind="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return current

    def engine_for(self, model: ServedModel) -> SequenceEngine:
        """The engine of this model; creating one retires the others (they drain, then stop)."""
        key = id(model.runtime)
        with self._engines_lock:
            found = self._engines.get(key)
            if found is not None and found.alive:
                return found
            for old_key, old in list(self._engines.items()):
                old.retire()
                del self._engines[old_key]
            # The runtime's own loop: workers/batch_engine.py on HF, workers/vllm_batch_engine.py on vLLM.
            created = model.runtime.batch_engine(max_batch_size=self.serve.max_batch_size, max_waiting=self.serve.max_queue,
                                                 name=model.checkpoint_id).start()
            self._engines[key] = created
            return created

    def engines(self) -> list[SequenceEngine]:
        with self._engines_lock:
            return list(self._engines.values())

    def stop(self) -> None:
        for eng in self.engines():
            eng.retire()

    def health(self) -> dict[str, Any]:
        failure, current, fallback = self.watcher.last_failure, self.watcher.current, self.watcher.fallback
        return {
            "status": "ok",
            "checkpoint_id": current.checkpoint_id if current else None,
            "last_swap_error": None if failure is None else {"checkpoint_id": failure.checkpoint_id, "error": failure.error},
            # Set while a fresh server whose champion failed to verify serves an earlier champion.
            "fallback": None if fallback is None else {"serving": fallback.serving, "champion": fallback.champion, "reason": fallback.reason},
            "running": sum(e.running for e in self.engines()),
            "waiting": sum(e.waiting for e in self.engines()),
            # What this process computes with: model.cpu_threads, and the served checkpoint's profile.
            "torch_threads": _torch_threads(),
            "context_length": current.runtime.profile.context_length if current else None,
            "prompt_format": current.runtime.profile.prompt_format if current else None,
        }

    def models(self) -> list[dict[str, Any]]:
        model = self.served()
        return [{"id": self.serve.model_name, "object": "model", "created": int(model.loaded_at), "owned_by": "kaizen", "checkpoint_id": model.checkpoint_id}]

    def model_card(self, model_id: str) -> dict[str, Any]:
        model = self.served()
        if model_id not in (self.serve.model_name, model.checkpoint_id):
            raise ApiError(404, f"model {model_id!r} is not served here; use {self.serve.model_name!r}", param="model", kind="not_found_error", code="model_not_found")
        return self.models()[0]

    # ------------------------------------------------------------------ preparing

    def _steering(self, raw: dict[str, Any] | None) -> SteeringSpec:
        try:
            return self.methods.parse(raw)
        except SteeringError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None

    def _decoder(self, spec: SteeringSpec, model: ServedModel) -> Decoder:
        try:
            return self.methods[spec.method].decoder(model.runtime, spec)
        except SteeringError as exc:  # e.g. a reward model whose tokenizer differs from the base's
            raise ApiError(400, str(exc), param=exc.param) from None

    def prepare(self, req: SamplingRequest, kind: str, render: Callable[[ServedModel, SteeringSpec, int], list[Prompt]]) -> Job:
        model = self.served()
        if req.model not in (self.serve.model_name, model.checkpoint_id):
            raise ApiError(404, f"model {req.model!r} is not served here; use {self.serve.model_name!r} (the current champion)", param="model", kind="not_found_error", code="model_not_found")
        spec = self._steering(req.steering)
        params = req.to_decode_params(self.limits)
        try:
            # The budget lets a URIAL prompt drop examples to leave room for the answer.
            prompts = render(model, spec, params.max_tokens)
        except ValueError as exc:  # e.g. a URIAL chat that does not end with a user turn
            raise ApiError(400, str(exc), param="messages" if kind == "chatcmpl" else "prompt") from None
        self._check_context(model, prompts, params)
        envelope = Envelope(f"{kind}-{uuid.uuid4().hex}", int(time.time()), self.serve.model_name, model.checkpoint_id,
                            {"checkpoint_id": model.checkpoint_id, "steering": spec.describe()})
        return Job(model, spec, params, prompts, self._decoder(spec, model), envelope)

    def _check_context(self, model: ServedModel, prompts: list[Prompt], params: DecodeParams) -> None:
        for prompt in prompts:
            try:
                # The checkpoint's profile: config positions (any architecture), tokenizer limit or model.context_length.
                check_context(model.runtime.profile, len(prompt.ids), params.max_tokens)
            except ContextLengthExceeded as exc:
                raise ApiError(400, str(exc), param="messages", code=exc.code) from None

    def text_prompt(self, model: ServedModel, text: str) -> Prompt:
        return Prompt(text, model.runtime.context_ids(text))

    def ids_prompt(self, model: ServedModel, ids: list[int]) -> Prompt:
        width = seqs.vocab_width(model.runtime)
        if any(t >= width for t in ids):
            raise ApiError(400, f"prompt token ids must be below the vocabulary size {width}", param="prompt")
        return Prompt(model.runtime.tokenizer.decode(ids, skip_special_tokens=False), list(ids))

    # ------------------------------------------------------------------ running

    def _sequences(self, job: Job, queue: asyncio.Queue[Event]) -> list[SequenceRequest]:
        loop = asyncio.get_running_loop()
        runtime = job.model.runtime
        width = seqs.vocab_width(runtime)
        out = []
        for p_index, prompt in enumerate(job.prompts):
            for j, seed in enumerate(seqs.choice_seeds(job.params.seed, job.params.n)):
                try:
                    adjust = seqs.per_token_adjustments(runtime, job.decoder, prompt.ids, job.params, width)
                except ValueError as exc:  # a schema llguidance cannot compile
                    raise ApiError(400, str(exc), param="response_format") from None
                out.append(SequenceRequest(
                    prompt.ids, seqs.sampling_spec(job.params, job.decoder, seed), _Channel(loop, queue, p_index * job.params.n + j),
                    processors=adjust.processors, reward_guidance=adjust.reward_guidance, json_schema=adjust.json_schema,
                    finalize=job.decoder.finish,
                ))
        return out

    def start(self, job: Job) -> Run:
        """Submit every choice of ``job`` (503 with Retry-After when the engine's queue is full)."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        sequences = self._sequences(job, queue)
        eng = self.engine_for(job.model)
        run = Run(sequences, queue)
        try:
            for sequence in sequences:
                eng.submit(sequence)
        except QueueFullError as exc:
            run.cancel()
            raise ApiError(503, f"the server is at capacity: {exc}; retry after {RETRY_AFTER_SECONDS} s", kind="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return run

    async def collect(self, job: Job, request: Request) -> list[ChoiceResult]:
        """Run a non-streamed request to the end; a client disconnect cancels it."""
        results = [ChoiceResult(i) for i in range(len(job.prompts) * job.params.n)]

        run = self.start(job)

        async def consume() -> None:
            async for event in run.events():
                choice = results[event.index]
                if event.kind == "token":
                    choice.text += event.piece
                    if event.token is not None:
                        choice.tokens.append(event.token)
                elif event.kind == "finish":
                    choice.finish_reason, choice.num_tokens = event.reason, event.num_tokens
                else:
                    raise ApiError(500, f"generation failed: {type(event.error).__name__}: {event.error}", kind="server_error")

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work not in done:
            # Free the slots now: the consumer's cancellation reaches Run.events' cleanup only
            # when the loop next runs it, and the engine would decode for nobody until then.
            run.cancel()
            work.cancel()
            log.info("serve.client_disconnected", id=job.envelope.ident)
            raise ApiError(499, "client closed the request", kind="client_closed")
        work.result()
        return results

    async def prompt_logprobs(self, job: Job, prompt: Prompt, top: int) -> list[TokenInfo]:
        """Log-probs of each prompt token given the ones before it (for ``echo`` with ``logprobs``)."""
        eng = self.engine_for(job.model)
        return await asyncio.wrap_future(eng.call(lambda: eng.score_prompt(prompt.ids, top)))


class Run:
    """The submitted sequences of one request and the queue their events arrive on."""

    def __init__(self, sequences: list[SequenceRequest], queue: asyncio.Queue[Event]) -> None:
        self.sequences, self.queue = sequences, queue

    def cancel(self) -> None:
        for sequence in self.sequences:
            sequence.cancel()  # a no-op for finished ones; frees the slots of an abandoned request

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's events until each has finished; leaving early cancels the rest."""
        open_choices = len(self.sequences)
        try:
            while open_choices:
                event = await self.queue.get()
                if event.kind != "token":
                    open_choices -= 1
                yield event
        finally:
            self.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
