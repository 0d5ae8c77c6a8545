"""Scoring for :class:`workers.runtime.ModelRuntime`: log-probabilities of given text, no sampling.

Prompt and completion are tokenised separately and their ids concatenated, so the boundary of a
scored pair is exact; left padding puts every completion at the end of its row, so only the last
columns of the logits are computed (``logits_to_keep``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from policies.model_profile import check_context
from workers.batching import ProgressCallback, chunks, common_prefix_length
from workers.prefix_cache import SharedPrefix, encode_shared_prefix, logits_after_prefix

if TYPE_CHECKING:
    import threading

    from policies.model_profile import ModelProfile


@dataclass(frozen=True)
class ContinuationDistribution:
    """The model's choice among a closed set of continuations of one prompt.

    ``probabilities`` are renormalised over the set (they sum to 1); ``mass`` is how much of the
    model's whole next-token distribution the set had before that. A small mass means the model
    wanted to write something else, and its choice among the set says little.
    """

    probabilities: list[float]
    mass: float


class ScoringMixin:
    """Log-prob scoring for :class:`workers.runtime.ModelRuntime`, which supplies the attributes below."""

    model: Any
    device: torch.device
    profile: ModelProfile
    pad_token_id: int
    _lock: threading.RLock
    _forward_params: set[str]
    context_ids: Callable[[str], list[int]]
    encode_completion: Callable[[str], list[int]]
    _left_pad: Callable[[Sequence[Sequence[int]]], tuple[torch.Tensor, torch.Tensor]]
    _forward_logits: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    _decode: Callable[[list[int]], str]

    def token_logprobs(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
        share_prefix: bool = True,
    ) -> list[list[float]]:
        """Per-token ``log p(completion token | prompt, previous completion tokens)`` for each pair.

        With ``share_prefix`` the tokens every prompt opens with (a chat template's system turn, a
        URIAL preamble) are computed once for the call (:mod:`workers.prefix_cache`); False
        computes every pair whole, the reference the reuse is tested against.
        """
        pairs = self._scored_pairs(prompts, completions)
        # Similar lengths together wastes less padding; results are put back in input order.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        results: list[list[float]] = [[] for _ in pairs]
        done = 0
        with self._lock, torch.inference_mode():
            prefix = self._shared_prompt_prefix([pairs[i] for i in order if pairs[i][1]]) if share_prefix else None
            for chunk in chunks(order, batch_size):
                scored = [i for i in chunk if pairs[i][1]]  # empty completions score 0 with no tokens
                if scored:
                    # Left padding puts every completion at the end of its row: completion token j of
                    # a row with n completion tokens sits at column width-n+j and is predicted by
                    # the logits at column width-n+j-1, so only the last max_n+1 columns matter.
                    max_n = max(len(pairs[i][1]) for i in scored)
                    logits, input_ids = self._last_logits([pairs[i][0] + pairs[i][1] for i in scored], prefix, keep_last=max_n + 1)
                    logprobs = torch.log_softmax(logits[:, :-1, :], dim=-1)  # predicts the last max_n columns
                    targets = input_ids[:, -max_n:]
                    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
                    for row, i in enumerate(scored):
                        n = len(pairs[i][1])
                        results[i] = picked[row, max_n - n :].tolist()
                done += len(chunk)
                if progress is not None:
                    progress(done, len(pairs))
        return results

    def _shared_prompt_prefix(self, pairs: Sequence[tuple[list[int], list[int]]]) -> SharedPrefix | None:
        """The shared prefix of scored (prompt, completion) pairs, cut before each prompt's last token,
        whose logits predict the completion's first token and so must be computed in the row."""
        if len(pairs) < 2:
            return None
        seqs = [prompt + completion for prompt, completion in pairs]
        return self._shared_prefix(seqs, min(common_prefix_length(seqs), min(len(prompt) for prompt, _ in pairs) - 1))

    def _scored_pairs(self, prompts: list[str], completions: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) of each pair, tokenised apart and checked against the context."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [(self.context_ids(p), self.encode_completion(c)) for p, c in zip(prompts, completions, strict=True)]
        for prompt_ids, completion_ids in pairs:
            check_context(self.profile, len(prompt_ids), len(completion_ids))
        return pairs

    def sequence_logprobs(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
        share_prefix: bool = True,
    ) -> list[float]:
        """Sum of ``log p(completion tokens | prompt)`` for each (prompt, completion) pair (see token_logprobs)."""
        per_token = self.token_logprobs(prompts, completions, batch_size=batch_size, progress=progress, share_prefix=share_prefix)
        return [float(sum(lps)) for lps in per_token]

    def candidate_token_ids(self, candidate_tokens: list[str]) -> list[int]:
        """The id of each candidate string's first token (skipping a bare word-start marker)."""
        ids: list[int] = []
        for cand in candidate_tokens:
            toks = self.encode_completion(cand)
            if not toks:
                raise ValueError(f"candidate {cand!r} encodes to no tokens")
            # SentencePiece tokenizers may encode "1" as ["▁", "1"]; the bare marker says nothing.
            if len(toks) > 1 and not self._decode(toks[:1]).strip() and cand.strip():
                toks = toks[1:]
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {candidate_tokens!r} share first tokens {ids}")
        return ids

    def next_token_distribution(
        self,
        prompts: list[str],
        candidate_tokens: list[str],
        *,
        batch_size: int = 8,
        share_prefix: bool = True,
    ) -> list[list[float]]:
        """P(next token = candidate's first token | prompt), renormalised over the candidates.

        ``share_prefix``: the prompts' shared opening is computed once (see token_logprobs)."""
        cand_ids = torch.tensor(self.candidate_token_ids(candidate_tokens), dtype=torch.long, device=self.device)
        contexts = [self.context_ids(p) for p in prompts]
        for ids in contexts:
            check_context(self.profile, len(ids), 0)
        results: list[list[float]] = []
        with self._lock, torch.inference_mode():
            prefix = self._shared_prefix(contexts) if share_prefix else None
            for chunk in chunks(contexts, batch_size):
                logits = self._last_logits(chunk, prefix, keep_last=1)[0][:, -1, :]
                probs = torch.softmax(logits.index_select(-1, cand_ids), dim=-1)
                results.extend(probs.cpu().tolist())
        return results

    def continuation_distribution(
        self,
        prompts: list[str],
        continuations: Sequence[str],
        *,
        batch_size: int = 8,
        share_prefix: bool = True,
    ) -> list[ContinuationDistribution]:
        """Which of ``continuations`` the model would write after each prompt, as probabilities.

        ``prompt + continuation`` is tokenised whole for every continuation, and the context is
        the token prefix they all share, so the split is the one the model writes itself whatever
        the tokenizer does with the space: "Score: 4" is [Score, :, " ", 4] for SmolLM2 (the
        context ends with the space token) but [Score, :, " 4"] for tokenizers with space-prefixed
        digits. When every continuation is one distinct token after the context, one forward pass
        of the context gives all of them; otherwise (a tokenizer that writes " 1" as two tokens
        but " 2" as one) each continuation's tokens are scored in full.

        With ``share_prefix`` the token prefix all contexts share (a judge's rubric) is computed
        once for the call and reused by every forward pass (:mod:`workers.prefix_cache`); False
        computes every context whole (the reference the reuse is tested against).
        """
        contexts, suffixes = self._continuation_requests(prompts, continuations)
        single = [i for i, s in enumerate(suffixes) if all(len(t) == 1 for t in s) and len({t[0] for t in s}) == len(s)]
        results: dict[int, ContinuationDistribution] = {}
        with self._lock, torch.inference_mode():
            prefix = self._shared_prefix(contexts) if share_prefix else None
            for chunk in chunks(single, batch_size):
                logits = self._last_logits([contexts[i] for i in chunk], prefix, keep_last=1)[0][:, -1, :]
                choice_ids = torch.tensor([[t[0] for t in suffixes[i]] for i in chunk], dtype=torch.long, device=self.device)
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, choice_ids)
                results.update(zip(chunk, map(distribution_of, logprobs.cpu().tolist()), strict=True))
            for i in sorted(set(range(len(prompts))) - set(single)):
                results[i] = distribution_of(self._suffix_logprobs(contexts[i], suffixes[i], batch_size, prefix))
        return [results[i] for i in range(len(prompts))]

    def _continuation_requests(self, prompts: list[str], continuations: Sequence[str]) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Each prompt's context ids and the ids of every continuation after it (see continuation_distribution)."""
        if len(continuations) < 2:
            raise ValueError("need at least two continuations to choose among")
        contexts: list[list[int]] = []
        suffixes: list[list[list[int]]] = []
        for prompt in prompts:
            context, prompt_suffixes = self._split_continuations(prompt, continuations)
            check_context(self.profile, len(context), max(len(t) for t in prompt_suffixes))
            contexts.append(context)
            suffixes.append(prompt_suffixes)
        return contexts, suffixes

    def _shared_prefix(self, contexts: Sequence[Sequence[int]], length: int | None = None) -> SharedPrefix | None:
        return encode_shared_prefix(self.model, contexts, self.device, self._forward_params, length)

    def _last_logits(self, seqs: Sequence[Sequence[int]], prefix: SharedPrefix | None, keep_last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits of each sequence's last ``keep_last`` positions, and the right-aligned ids
        they were run on (with a prefix, only the ids after it)."""
        if prefix is not None:
            return logits_after_prefix(self.model, prefix, seqs, self.pad_token_id, self.device, keep_last)
        input_ids, attention_mask = self._left_pad(seqs)
        return self._forward_logits(input_ids, attention_mask, keep_last=keep_last), input_ids

    def _split_continuations(self, prompt: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        encoded = [self.context_ids(prompt + continuation) for continuation in continuations]
        shared = common_prefix_length(encoded)
        if shared == 0:
            raise ValueError(f"prompt {prompt[:40]!r}... shares no token with its continuations {list(continuations)!r}")
        suffixes = [ids[shared:] for ids in encoded]
        if any(not suffix for suffix in suffixes) or len({tuple(suffix) for suffix in suffixes}) != len(suffixes):
            raise ValueError(f"continuations {list(continuations)!r} are not told apart by their tokens")
        return encoded[0][:shared], suffixes

    def _suffix_logprobs(self, context: list[int], suffixes: list[list[int]], batch_size: int, prefix: SharedPrefix | None) -> list[float]:
        """log p(suffix | context), summed over the suffix tokens, for each suffix."""
        totals: list[float] = []
        for chunk in chunks(suffixes, batch_size):
            longest = max(len(suffix) for suffix in chunk)
            # Every row ends in the last column, so each suffix sits at the end; see token_logprobs.
            logits, input_ids = self._last_logits([context + suffix for suffix in chunk], prefix, keep_last=longest + 1)
            logprobs = torch.log_softmax(logits[:, :-1, :], dim=-1)
            picked = logprobs.gather(-1, input_ids[:, -longest:].unsqueeze(-1)).squeeze(-1).cpu()
            totals += [float(picked[row, longest - len(suffix) :].sum()) for row, suffix in enumerate(chunk)]
        return totals


def distribution_of(logprobs: Sequence[float]) -> ContinuationDistribution:
    """Renormalise the log-probabilities of a closed set of continuations; keep their total mass."""
    values = torch.tensor(logprobs, dtype=torch.float64)
    return ContinuationDistribution(torch.softmax(values, dim=-1).tolist(), float(torch.logsumexp(values, dim=-1).exp()))
