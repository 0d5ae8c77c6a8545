import math

import pytest
import torch

from policies.genarm import (
    GuidanceError,
    align_vocab_width,
    arm_reward,
    bradley_terry_loss,
    guidance_delta,
    guided_scores,
    pair_accuracy,
    truncate_prompt_completion,
    validate_beta,
    validate_weights,
    vocabulary_differences,
)

# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan")])
def test_beta_must_be_finite_and_positive(beta):
    with pytest.raises(GuidanceError, match="beta must be a finite number > 0"):
        validate_beta(beta)


def test_valid_beta_is_returned_as_float():
    assert validate_beta(2) == 2.0


def test_weights_accept_zero_and_positive_values():
    assert validate_weights([0, 0.5, 3]) == (0.0, 0.5, 3.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    with pytest.raises(GuidanceError, match="weight #1 must be finite"):
        validate_weights([1.0, bad])


def test_negative_weights_are_refused_with_the_alternative_named():
    with pytest.raises(GuidanceError, match="swapped pairs"):
        validate_weights([0.5, -0.1])


# --- training math ---------------------------------------------------------------------


def test_arm_reward_scales_the_summed_logprobs_by_beta():
    assert torch.equal(arm_reward(torch.tensor([-2.0, -4.0]), 0.5), torch.tensor([-1.0, -2.0]))


def test_bradley_terry_loss_matches_the_formula():
    chosen, rejected = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0])
    beta = 0.5
    expected = -(math.log(1 / (1 + math.exp(-beta * 2.0))) + math.log(1 / (1 + math.exp(-beta * -3.0)))) / 2
    assert bradley_terry_loss(chosen, rejected, beta).item() == pytest.approx(expected)


def test_bradley_terry_loss_is_log2_for_tied_scores_and_falls_with_the_margin():
    tied = bradley_terry_loss(torch.tensor([-3.0]), torch.tensor([-3.0]), 1.0).item()
    ahead = bradley_terry_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 1.0).item()
    assert tied == pytest.approx(math.log(2))
    assert ahead < tied


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected, 1.0).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # gradient descent moves chosen up, rejected down


def test_bradley_terry_refuses_unpaired_scores():
    with pytest.raises(GuidanceError, match="pair up"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3), 1.0)


def test_pair_accuracy_counts_strict_wins_only():
    assert pair_accuracy(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-2.0, -2.0, -1.0, -5.0])) == 0.5


def test_pair_accuracy_needs_pairs():
    with pytest.raises(GuidanceError):
        pair_accuracy(torch.tensor([]), torch.tensor([]))


def test_truncation_keeps_short_pairs_untouched():
    assert truncate_prompt_completion([1, 2], [3, 4], 4) == ([1, 2], [3, 4])


def test_truncation_keeps_the_prompt_end_and_the_completion_start():
    prompt, completion = truncate_prompt_completion(list(range(10)), list(range(100, 110)), 8)
    assert completion == [100, 101, 102, 103]  # 8 - min(10, 8 // 2)
    assert prompt == [6, 7, 8, 9]
    assert len(prompt) + len(completion) == 8


def test_truncation_gives_a_short_prompt_all_it_needs():
    prompt, completion = truncate_prompt_completion([1, 2], list(range(100, 120)), 8)
    assert prompt == [1, 2] and completion == list(range(100, 106))


# --- decoding math ---------------------------------------------------------------------


def test_guidance_delta_is_the_weighted_sum_over_beta():
    a = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    b = torch.log_softmax(torch.tensor([[3.0, 0.0, 1.0]]), dim=-1)
    delta = guidance_delta([a, b], [1.0, 0.5], beta=2.0)
    assert torch.allclose(delta, (a + 0.5 * b) / 2.0)


def test_zero_weight_ignores_minus_infinity_instead_of_producing_nan():
    a = torch.tensor([[0.0, float("-inf")]])
    delta = guidance_delta([a], [0.0], beta=1.0)
    assert torch.equal(delta, torch.zeros(1, 2))


def test_all_zero_weights_leave_base_scores_bitwise_unchanged():
    base = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    arm = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert torch.equal(guided_scores(base, [arm, arm], [0.0, 0.0], beta=0.3), base)


def test_guidance_on_raw_logits_gives_the_same_distribution_as_on_logprobs():
    logits = torch.randn(2, 11, generator=torch.Generator().manual_seed(2)) * 3
    arm = torch.log_softmax(torch.randn(2, 11, generator=torch.Generator().manual_seed(3)), dim=-1)
    from_logits = torch.softmax(guided_scores(logits, [arm], [0.7], beta=0.5), dim=-1)
    from_logprobs = torch.softmax(torch.log_softmax(logits, dim=-1) + 0.7 / 0.5 * arm, dim=-1)
    assert torch.allclose(from_logits, from_logprobs, atol=1e-6)


def test_guidance_raises_the_probability_of_the_tokens_the_reward_model_prefers():
    base = torch.zeros(1, 4)  # uniform
    arm = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    probs = torch.softmax(guided_scores(base, [arm], [1.0], beta=1.0), dim=-1)
    assert probs[0, 0] == pytest.approx(0.7)
    sharper = torch.softmax(guided_scores(base, [arm], [1.0], beta=0.5), dim=-1)
    assert sharper[0, 0] > probs[0, 0]  # smaller beta = stronger guidance


def test_guidance_validates_its_inputs():
    lp = torch.zeros(1, 3)
    with pytest.raises(GuidanceError, match="at least one"):
        guidance_delta([], [], 1.0)
    with pytest.raises(GuidanceError, match="2 reward models but 1 weights"):
        guidance_delta([lp, lp], [1.0], 1.0)
    with pytest.raises(GuidanceError, match="different shapes"):
        guidance_delta([lp, torch.zeros(1, 4)], [1.0, 1.0], 1.0)
    with pytest.raises(GuidanceError, match="differ in shape"):
        guided_scores(torch.zeros(1, 4), [lp], [1.0], 1.0)
    with pytest.raises(GuidanceError, match=">= 0"):
        guidance_delta([lp], [-1.0], 1.0)


def test_vocab_alignment_truncates_or_pads_with_minus_infinity():
    lp = torch.log_softmax(torch.zeros(2, 4), dim=-1)
    assert torch.equal(align_vocab_width(lp, 4), lp)
    assert torch.equal(align_vocab_width(lp, 3), lp[:, :3])
    padded = align_vocab_width(lp, 6)
    assert padded.shape == (2, 6)
    assert torch.equal(padded[:, :4], lp) and torch.isneginf(padded[:, 4:]).all()


# --- tokenizer comparison --------------------------------------------------------------


def test_identical_vocabularies_have_no_differences():
    assert vocabulary_differences({"a": 0, "b": 1}, {"b": 1, "a": 0}) == []


def test_vocabulary_differences_name_sizes_missing_tokens_and_moved_ids():
    base = {"a": 0, "b": 1, "c": 2, "x": 3}
    reward = {"a": 0, "b": 2, "c": 1}
    differences = vocabulary_differences(base, reward)
    assert differences[0] == "vocabulary sizes 4 vs 3"
    assert any("1 tokens only in the base" in d and "'x'" in d for d in differences)
    assert any("2 tokens with different ids" in d and "'b': 1 vs 2" in d for d in differences)
