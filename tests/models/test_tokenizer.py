"""The shipped byte-level BPE tokenizer: determinism, round-trips, template, lengths."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmdistill.models.tokenizer import CHAT_TEMPLATE, ENGLISH_SENTENCES, build_tokenizer
from mmdistill.tasks.arith import make_samples
from tests.helpers import REPO, command_env

ASSET = REPO / "assets" / "tokenizer"
ALL_OPS = ("+", "-", "*")

# Measured with the shipped tokenizer (digits one per token), over many samples of all ops.
# digits<=3: prompt in the chat template with generation prompt <= 19, response <= 41.
MAX_PROMPT_TOKENS_D3 = 19
MAX_RESPONSE_TOKENS_D3 = 41


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = build_tokenizer(str(d))
    return tok, d


@pytest.fixture(scope="module")
def shipped():
    return AutoTokenizer.from_pretrained(str(ASSET))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_build_is_deterministic_across_processes(built, tmp_path):
    _, d = built
    code = "import sys; from mmdistill.models.tokenizer import build_tokenizer; build_tokenizer(sys.argv[1])"
    other = tmp_path / "again"
    r = subprocess.run([sys.executable, "-c", code, str(other)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=command_env(PYTHONHASHSEED="12345"))
    assert r.returncode == 0, r.stderr
    assert (other / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()


def test_shipped_asset_is_current(built):
    _, d = built
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert _sha(ASSET / name) == _sha(d / name), f"assets/tokenizer/{name} is stale; rebuild it"


def test_shipped_loads_with_specials(shipped):
    tok = shipped
    assert len(tok) == 512
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token is None
    assert tok.model_max_length == 512
    assert tok.chat_template == CHAT_TEMPLATE
    for s in ("<|pad|>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [s]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    # no bos/eos added implicitly
    assert tok.encode("Compute 1+2.") == tok.encode("Compute 1+2.", add_special_tokens=False)


def test_chat_template_renders(shipped):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Compute 47+38."}]
    text = shipped.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nCompute 47+38.<|im_end|>\n<|im_start|>assistant\n")
    no_gen = shipped.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nCompute 47+38.<|im_end|>\n"
    ids = shipped.apply_chat_template(msgs[1:], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == shipped.encode(no_gen + "<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1


def test_round_trip_every_sample(shipped):
    texts = []
    for digits in (1, 2, 3, 4):
        n = 20 if digits == 1 else 300
        for split in ("train", "test"):
            for s in make_samples(n if split == "train" else n // 5, 11, split, digits, ALL_OPS):
                texts += [s["prompt"], s["reasoning"], s["hint"], s["response"], s["answer"],
                          s["prompt"] + "\nHint: " + s["hint"]]
    texts += list(ENGLISH_SENTENCES) + [" leading space", "trailing  \n\n", "tabs\tand ünïcödé ✓ 日本",
                                        "<|im_start|>user\nhi<|im_end|>\n"]
    enc = shipped(texts, add_special_tokens=False)["input_ids"]
    for x, ids in zip(texts, enc):
        assert shipped.decode(ids) == x


def test_digits_are_single_tokens(shipped):
    toks = shipped.convert_ids_to_tokens(shipped.encode("Compute 4738+9.", add_special_tokens=False))
    assert [t for t in toks if any(c.isdigit() for c in t)] == ["4", "7", "3", "8", "9"]


def test_max_token_lengths_digits_le_3(shipped):
    prompt_max = resp_max = 0
    for digits in (1, 2, 3):
        n = {1: 30, 2: 800, 3: 2000}[digits]
        for split, k in (("train", n), ("test", n // 6)):
            samples = make_samples(k, 1, split, digits, ALL_OPS)
            enc_p = [shipped.apply_chat_template([{"role": "user", "content": s["prompt"]}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=False) for s in samples]
            enc_r = shipped([s["response"] for s in samples], add_special_tokens=False)["input_ids"]
            prompt_max = max(prompt_max, max(map(len, enc_p)))
            resp_max = max(resp_max, max(map(len, enc_r)))
    print(f"digits<=3: max prompt-with-template tokens {prompt_max}, max response tokens {resp_max}")
    assert prompt_max == MAX_PROMPT_TOKENS_D3
    assert resp_max == MAX_RESPONSE_TOKENS_D3
    assert resp_max + 1 < 48  # response plus <|im_end|> fits a 48-token generation budget
