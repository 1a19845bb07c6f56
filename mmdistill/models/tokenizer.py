"""Build the project's small byte-level BPE tokenizer (vocab 512, ChatML template).

Trained with the ``tokenizers`` library on a deterministic corpus: arith samples (all ops, digits
1..4; prompts, responses and hints) plus a few generic English sentences, so that both the task
and the surrounding prompt text tokenize compactly. Byte-level, so every string round-trips
exactly: ``decode(encode(x)) == x``.

Digits are split one per token (``pre_tokenizers.Digits(individual_digits=True)`` before the
``ByteLevel`` pre-tokenizer, as Qwen-style tokenizers do): a tiny model learns column arithmetic
far more easily when ``47`` is ``4`` ``7`` and not one of ~100 opaque number tokens. Pass
``split_digits=False`` for the plain GPT-2 style pre-tokenization.

``python -m data_tools build-tokenizer --out assets/tokenizer`` writes the shipped copy.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmdistill.tasks import arith

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ENGLISH_SENTENCES = (
    "You are a helpful assistant.",
    "You are a careful student. Solve the problem step by step.",
    "Here is a hint that may help you solve the problem.",
    "Hint: work through the digits from the ones column upward.",
    "Reference solution: follow the worked steps, then give the final answer.",
    "Here is an example of a correct solution to the same problem.",
    "Think about the problem before you write the answer.",
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question and explain your reasoning briefly.",
    "The image shows a red box on the left and a blue circle on the right.",
    "Describe what you see in the picture, then answer the question.",
    "What is the result? Give only the number after the word Answer.",
    "A teacher explains the method; the student tries it on a new problem.",
    "This is a test of the tokenizer with ordinary English text, numbers like 12 and 345.",
)
_ROLES = ("system", "user", "assistant")


def training_corpus(n_per_setting: int = 150) -> list[str]:
    """The deterministic list of texts the BPE is trained on."""
    texts: list[str] = []
    for op in arith.OPS:
        for digits in (1, 2, 3, 4):
            # digits=1 pools are small; take what a split can give.
            n = n_per_setting if digits > 1 else 20
            for s in arith.make_samples(n, seed=0, split="train", digits=digits, ops=(op,)):
                texts.extend((s["prompt"], s["response"], s["hint"]))
    texts.extend(ENGLISH_SENTENCES)
    for role in _ROLES:
        texts.append(f"{role}\n")
    return texts


def _build_backend(split_digits: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


def build_tokenizer(out_dir: str | None = None, *, split_digits: bool = True) -> PreTrainedTokenizerFast:
    """Train the tokenizer (deterministic) and, if ``out_dir`` is given, save_pretrained there."""
    backend = _build_backend(split_digits)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer
