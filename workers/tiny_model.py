"""The built-in tiny model: a few-layer Llama with a byte-level BPE tokenizer trained locally.

No hub access is possible on the machines kaizen is tested on, so the default run and the
tests use a model the project builds itself. It is loaded afterwards exactly like any other
checkpoint (``from_pretrained`` on its directory).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A ChatML-like template: simple, unambiguous role markers that the tokenizer keeps whole.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = """
Write a short poem about the sea. Explain how photosynthesis works in simple terms.
Give three tips for learning a new language. Summarize the plot of a detective story.
Describe the water cycle. What is the difference between a list and a tuple in Python?
Please act as an impartial judge and evaluate the response. Score: 1 2 3 4 5 points.
The response is relevant, covers the question, is useful, clear and shows expertise.
Answer the question helpfully and honestly. Be concise, accurate and polite.
Here is an answer: the result is computed step by step, then checked once more.
"""


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATES = {"tiny": CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}
ARCHITECTURES = ("llama", "gpt2", "qwen2", "gpt_neox")


def build_tokenizer(
    extra_corpus: list[str] | None = None,
    vocab_size: int = 512,
    *,
    chat_template: str | None = "tiny",
    pad_token: bool = True,
    eos_token: bool = True,
) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer; ``chat_template`` is "tiny", "chatml" or None (a base model)."""
    corpus = [line for line in _CORPUS.splitlines() if line.strip()] + list(extra_corpus or [])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus, vocab_size),
        bos_token=BOS,
        eos_token=EOS if eos_token else None,
        pad_token=PAD if pad_token else None,
        padding_side="left",
        additional_special_tokens=ROLE_TOKENS + (CHATML_TOKENS if chat_template == "chatml" else []),
    )
    if chat_template == "chatml":
        tokenizer.eos_token = "<|im_end|>" if eos_token else None
    if chat_template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
    return tokenizer


def _config(arch: str, tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, context_length: int, tie: bool = True):
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    common = {"vocab_size": len(tokenizer), "tie_word_embeddings": tie, **ids}
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=context_length, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
            max_position_embeddings=context_length, **common,
        )
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return config_cls(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context_length, **common,
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    extra_corpus: list[str] | None = None,
    arch: str = "llama",
    chat_template: str | None = "tiny",
    context_length: int = 2048,
    pad_token: bool = True,
    eos_token: bool = True,
    vocab_size: int = 512,
    tie_embeddings: bool = True,
    output_scale: float = 1.0,
) -> Path:
    """Write a randomly initialised tiny causal LM plus its tokenizer to ``out_dir``, as a
    checkpoint with a manifest (so its corruption is detected like any other checkpoint's).

    ``arch`` is one of :data:`ARCHITECTURES`; ``chat_template`` None makes a base model (no
    template), ``pad_token``/``eos_token`` False leave those tokens out (as some real tokenizers do).

    ``output_scale`` multiplies the output layer (which needs ``tie_embeddings=False``). A random
    model's logits span only about ``±0.02 · hidden_size`` (±2.6 at hidden size 128), and a LoRA
    adapter, which leaves the output layer and the final norm frozen, cannot widen that: every
    prediction stays nearly uniform (an SFT loss floor near 3.7 nats), each token's gradient stays
    large against that ceiling, and what the answer should depend on is learned late or not at
    all. A trained model's logits span tens of units; a scale of about 6 gives the random model
    that range. Untied, the output layer is its own: a tied random model predicts the token it
    has just read (the residual stream is mostly that token's embedding).
    """
    if output_scale != 1.0 and tie_embeddings:
        raise ValueError("output_scale needs tie_embeddings=False: scaling a tied output layer scales the input embeddings too")
    from workers.checkpoints import write_checkpoint

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHITECTURES}")
    tokenizer = build_tokenizer(extra_corpus, vocab_size, chat_template=chat_template, pad_token=pad_token, eos_token=eos_token)
    config = _config(arch, tokenizer, hidden_size, num_layers, context_length, tie=tie_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(output_scale)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_checkpoint(out_dir, write, {"model": "tiny", "arch": arch, "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed})
