"""Loop generation through the continuous-batching engine (``generation.scheduler: continuous``).

:meth:`workers.generation.GenerationMixin.generate` decodes static chunks: a chunk of
``batch_size`` rows runs until its longest row stops, so rows that ended early (EOS, a stop string)
keep being decoded as padding. Here every decoded sequence is a :class:`SequenceRequest` of a
:class:`BatchEngine` started for the call (``max_batch_size`` = the call's ``batch_size``): a
finished row leaves the batch at the next step and a waiting one takes its place. The engine is
retired when every sequence has finished.

What comes back is each sequence's generated token ids, so the caller turns them into
:class:`Generation` objects with the same code as the static path (EOS cut, stop-string cut,
``num_tokens``, ``finished``): greedy answers are the same text either way
(tests/workers/test_continuous_generation.py).

Seeds: sequence (prompt i, sample j) samples from its own generator seeded with
:func:`sequence_seed` ``(seed, i, j)``, so a rerun with the same seed reproduces every answer,
whatever order the engine finishes them in. Without a seed the base is drawn from torch's global
RNG, so two unseeded calls sample differently (as on the static path).
"""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from policies.end_ramp import EndRamp
from workers.batch_engine import BatchEngine, SamplingSpec, SequenceRequest, TokenInfo
from workers.batching import ProgressCallback

ENGINE_POLL_SECONDS = 5.0
"""How often the caller checks that the engine thread is still alive while it waits."""


def admit_group(batch_size: int, device: torch.device) -> int:
    """Free slots a running batch gathers before waiting sequences join (``BatchEngine.admit_min``).

    On a CPU a quarter of the batch: every admission copies the whole KV cache once (SmolLM2's
    shape, 31 rows x 250 positions joined by one: 0.18 s on one core of the project's machine),
    while a CPU decode step costs in proportion to its rows, so a slot left empty for a few steps
    costs little. On an accelerator a step costs about the same whatever its rows and the copy is
    cheap, so a free slot is filled at once."""
    return max(1, batch_size // 4) if device.type == "cpu" else 1


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample), deterministic in its arguments and unrelated across them."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class DecodedSequence:
    """One sequence's generated ids (the EOS token included when it ended there) and the engine's reason."""

    ids: list[int]
    reason: str


class _Collector:
    """Listener of one sequence: tells the waiting caller when it is done (the ids are in
    ``SequenceRequest.generated``; the text is rebuilt from them as on the static path)."""

    def __init__(self, key: tuple[int, int], events: queue.Queue[tuple[tuple[int, int], BaseException | None]]) -> None:
        self.key, self.events = key, events
        self.reason = ""

    def on_token(self, piece: str, token: TokenInfo | None) -> None:
        pass

    def on_finish(self, reason: str, num_tokens: int) -> None:
        self.reason = reason
        self.events.put((self.key, None))

    def on_error(self, error: BaseException) -> None:
        self.events.put((self.key, error))


def decode_continuously(
    runtime: Any,
    contexts: Sequence[list[int]],
    decoded: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stops: Sequence[str],
    batch_size: int,
    progress: ProgressCallback | None = None,
    share_prefix: bool = True,
    end_ramp: EndRamp | None = None,
) -> list[list[DecodedSequence]]:
    """``decoded[i]`` sequences for each prompt context, in order (prompt i's samples 0..n-1).

    ``progress(done, total)`` is called from the calling thread each time all of a prompt's
    sequences have finished (prompts may complete out of order; ``done`` counts them).
    ``share_prefix`` goes to the engine (:class:`BatchEngine`); ``end_ramp`` to every sequence."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # advances the global RNG: fresh samples per call
    events: queue.Queue[tuple[tuple[int, int], BaseException | None]] = queue.Queue()
    collectors = [[_Collector((i, j), events) for j in range(n)] for i, n in enumerate(decoded)]
    total = sum(decoded)
    engine = BatchEngine(
        runtime, max_batch_size=batch_size, max_waiting=max(total, 1), name="loop", admit_min=admit_group(batch_size, runtime.device),
        share_prefix=share_prefix,
    )
    requests: list[SequenceRequest] = []
    try:
        for i, context in enumerate(contexts):
            for j, collector in enumerate(collectors[i]):
                spec = SamplingSpec(
                    max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=sequence_seed(seed, i, j), stops=tuple(stops), end_ramp=end_ramp,
                )
                request = SequenceRequest(list(context), spec, collector)
                requests.append(request)
                engine.submit(request)
        engine.start()  # after every submit: the first admission fills the whole batch at once
        remaining = list(decoded)
        done_prompts = 0
        for _ in range(total):
            key, error = _next_event(events, engine)
            if error is not None:
                raise error  # what the engine thread's forward or sampling raised
            remaining[key[0]] -= 1
            if remaining[key[0]] == 0:
                done_prompts += 1
                if progress is not None:
                    progress(done_prompts, len(contexts))
    except BaseException:
        for request in requests:
            request.cancel()
        raise
    finally:
        engine.retire()
        engine.join()
    # The queue's hand-over orders each on_finish before this read of the engine thread's list.
    finished = iter(requests)
    return [[DecodedSequence(list(next(finished).generated), collector.reason) for collector in row] for row in collectors]


def _next_event(events: queue.Queue[tuple[tuple[int, int], BaseException | None]], engine: BatchEngine) -> tuple[tuple[int, int], BaseException | None]:
    while True:
        try:
            return events.get(timeout=ENGINE_POLL_SECONDS)
        except queue.Empty:
            if not engine.alive:
                raise RuntimeError("the batch engine stopped before every sequence finished") from None
