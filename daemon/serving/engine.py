"""From a validated request to text: render the prompt for the steering method, then decode.

URIAL renders the conversation as ``# Query:`` / ``# Answer:`` examples with no chat template;
SteerLM puts the requested attribute string into the conversation the way its SFT stage trained
it; GenARM decodes with reward models guiding each token; ``none`` uses the model's chat template.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from policies.steering import METHOD_GENARM, METHOD_STEERLM, METHOD_URIAL, SteeringSpec, stop_strings_for
from policies.stop_stream import StopStringStream
from workers.runtime import Generation, ModelRuntime


@dataclass(frozen=True)
class DecodeParams:
    max_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


def render_chat_prompt(runtime: ModelRuntime, messages: list[dict], spec: SteeringSpec, urial_preset) -> str:  # type: ignore[no-untyped-def]
    if spec.method == METHOD_URIAL:
        from policies.urial import render_urial_prompt

        return render_urial_prompt(messages, urial_preset)
    if spec.method == METHOD_STEERLM:
        from policies.steerlm import steerlm_messages

        return runtime.render_chat(steerlm_messages(messages, spec.attributes))
    return runtime.render_chat(messages)


def render_completion_prompt(runtime: ModelRuntime, prompt: str, spec: SteeringSpec, urial_preset) -> str:  # type: ignore[no-untyped-def]
    """/v1/completions continues raw text; URIAL and SteerLM treat it as one user turn."""
    if spec.method in (METHOD_URIAL, METHOD_STEERLM):
        return render_chat_prompt(runtime, [{"role": "user", "content": prompt}], spec, urial_preset)
    return prompt


def decode(
    runtime: ModelRuntime, prompt: str, params: DecodeParams, spec: SteeringSpec, guides: Sequence[tuple[ModelRuntime, float]] = ()
) -> list[Generation]:
    stops = stop_strings_for(spec.method, params.stop)
    if spec.method == METHOD_GENARM:
        from workers.genarm import guided_generate

        return [
            guided_generate(
                runtime, list(guides), [prompt], beta=spec.beta, max_new_tokens=params.max_tokens,
                temperature=params.temperature, top_p=params.top_p,
                seed=(params.seed if params.seed is not None else 0) + i, stop=stops,
            )[0]
            for i in range(params.n)
        ]
    generations = runtime.generate(
        [prompt], num_samples=params.n, max_new_tokens=params.max_tokens, temperature=params.temperature,
        top_p=params.top_p, seed=params.seed, stop_strings=stops,
    )[0]
    if spec.method == METHOD_URIAL:
        from policies.urial import cut_at_stop

        # A token limit can leave the start of the next "# Query:" line behind.
        generations = [replace(g, text=cut_at_stop(g.text)) for g in generations]
    return generations


def stream(
    runtime: ModelRuntime, prompt: str, params: DecodeParams, spec: SteeringSpec, guides: Sequence[tuple[ModelRuntime, float]] = ()
) -> Iterator[str]:
    """Yield text pieces of one completion (``params.n`` must be 1) as tokens are decoded; the
    pieces join to the non-streamed completion."""
    if spec.method == METHOD_GENARM:
        # Guided decoding runs its own loop; it is returned as one piece.
        text = decode(runtime, prompt, params, spec, guides)[0].text
        if text:
            yield text
        return
    from transformers import TextIteratorStreamer

    stops = stop_strings_for(spec.method, params.stop)
    streamer = TextIteratorStreamer(runtime.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            runtime.generate(
                [prompt], num_samples=1, max_new_tokens=params.max_tokens, temperature=params.temperature,
                top_p=params.top_p, seed=params.seed, stop_strings=stops, streamer=streamer,
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, name="stream-decode", daemon=True)
    worker.start()
    gate = StopStringStream(stops)
    for piece in streamer:
        out = gate.push(piece)
        if out:
            yield out
    worker.join()
    if failure:
        raise failure[0]
    tail = gate.flush()
    if tail:
        yield tail
