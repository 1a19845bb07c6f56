"""Text adapter: any Hugging Face causal LM behind the token-level view interface.

Each view's input is its own prompt (plain, or with the privileged text spliced into the user
turn) followed by the SAME response token ids. The response is appended as ids, never
re-tokenised with the prompt, so every view predicts exactly the tokens the student sampled.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from mmdistill.batch import Batch


class TemplateError(ValueError):
    """A chat template that would make views disagree on the response."""


class ContextTooLong(ValueError):
    """A prompt that does not fit: we never cut the question or the privileged text."""


def cut_prefix(text: str, ratio: float) -> str:
    """The first `ratio` of `text`'s characters, extended to the end of the current word.

    Texts of two words or fewer are kept whole: cutting them leaves nothing usable.
    """
    if len(text.split()) <= 2 or ratio >= 1.0:
        return text
    n = math.ceil(ratio * len(text))
    if n <= 0:
        return ""
    while n < len(text) and not text[n].isspace() and not text[n - 1].isspace():
        n += 1
    return text[:n].rstrip()


def response_mask(ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including each row's first EOS (all True if it never stopped)."""
    is_eos = torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            attn[i, width - len(s):] = 1
    return ids.to(device), attn.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


class TextAdapter:
    """Builds each view's prompt from a sample record and scores responses under it.

    A sample holds the task as `prompt` (one user turn) or `messages` (a chat), an optional
    `system`, and privileged fields (`hint`, `reasoning`, `answer`, ...) that
    `privileged.text` formats into p. An empty p gives the plain prompt, so `student_priv`
    then equals `student` exactly.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, privileged: Any, max_length: int):
        self.tok = tokenizer
        self.priv = privileged
        self.max_length = max_length
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = sorted({tokenizer.eos_token_id})
        check_template(tokenizer)

    # -- prompts ---------------------------------------------------------------------------

    def privileged_text(self, sample: dict, level: str | None) -> str:
        if level is None:
            return ""
        fields = dict(sample)
        if level == "partial":
            fields[self.priv.partial_field] = cut_prefix(self._field(sample, self.priv.partial_field), self.priv.partial_ratio)
        try:
            return self.priv.text.format_map(fields).strip()
        except KeyError as exc:
            raise KeyError(f"sample '{sample.get('id', '?')}' has no field {exc} needed by privileged.text") from None

    def messages(self, sample: dict, level: str | None) -> list[dict]:
        if "messages" in sample:
            msgs = [dict(m) for m in sample["messages"]]
        else:
            msgs = [{"role": "user", "content": self._field(sample, "prompt")}]
        if sample.get("system"):
            msgs.insert(0, {"role": "system", "content": sample["system"]})
        p = self.privileged_text(sample, level)
        if p:
            last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[last_user]["content"] = self.priv.template.format(prompt=msgs[last_user]["content"], privileged=p)
        return msgs

    def prompt_ids(self, samples: list[dict], level: str | None) -> list[list[int]]:
        texts = [self.tok.apply_chat_template(self.messages(s, level), add_generation_prompt=True, tokenize=False) for s in samples]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        if level is not None:
            plain = self.prompt_ids(samples, None)
            for s, a, b in zip(samples, ids, plain):
                if a == b and self.privileged_text(s, level):
                    raise TemplateError(
                        f"sample '{s.get('id', '?')}': the chat template dropped the privileged text "
                        "(privileged and plain prompts are identical)"
                    )
        return ids

    def _field(self, sample: dict, name: str) -> str:
        if name not in sample:
            raise KeyError(f"sample '{sample.get('id', '?')}' has no field '{name}'")
        return sample[name]

    def _check_fits(self, samples: list[dict], prompts: list[list[int]], response_len: int, what: str) -> None:
        for s, p in zip(samples, prompts):
            if self.max_length and len(p) + response_len > self.max_length:
                raise ContextTooLong(
                    f"sample '{s.get('id', '?')}': {what} prompt of {len(p)} tokens + {response_len} response "
                    f"tokens exceeds the context of {self.max_length} (raise train.max_length or shorten the sample)"
                )

    # -- responses -------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, samples: list[dict], cfg: Any) -> Batch:
        """Sample from the student WITHOUT privileged information (KV-cached `generate`)."""
        samples = [s for s in samples for _ in range(cfg.num_rollouts)]
        prompts = self.prompt_ids(samples, None)
        self._check_fits(samples, prompts, cfg.max_new_tokens, "student")
        device = next(model.parameters()).device
        ids, attn = left_pad(prompts, self.pad_id, device)
        greedy = cfg.temperature == 0
        gen = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else cfg.temperature,
            top_p=None if greedy else cfg.top_p,
            top_k=None if greedy else 0,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            use_cache=True,
        )
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
        finally:
            model.train(was_training)
        resp = out[:, ids.shape[1]:]
        if resp.shape[1] == 0:  # max_new_tokens reached nothing? generate always yields >= 1
            raise RuntimeError("generate returned no tokens")
        mask = response_mask(resp, self.eos_ids)
        return Batch(resp.masked_fill(~mask, self.pad_id), mask, samples, on_policy=True)

    def oracle_batch(self, samples: list[dict]) -> Batch:
        """Reference responses (for SFT and off-policy mixing), ending with EOS like a rollout."""
        resp = self.tok([self._field(s, "response") for s in samples], add_special_tokens=False)["input_ids"]
        resp = [r + [self.eos_ids[0]] for r in resp]
        for s, p, r in zip(samples, self.prompt_ids(samples, None), resp):
            self._check_fits([s], [p], len(r), "student")
        ids, mask = right_pad(resp, self.pad_id, torch.device("cpu"))
        return Batch(ids, mask, samples, on_policy=False)

    # -- scoring ---------------------------------------------------------------------------

    def logits(self, model: torch.nn.Module, batch: Batch, level: str | None, grad: bool) -> torch.Tensor:
        """[B, N, V] next-token logits (model dtype) at each response position under this view.

        Logits, not log-probs: methods normalise them chunk by chunk in float32 (chunked.py), so
        no [B, N, V] float32 copy is made per view.
        """
        prompts = self.prompt_ids(batch.samples, level)
        n = batch.response_ids.shape[1]
        self._check_fits(batch.samples, prompts, n, "scored")
        device = next(model.parameters()).device
        ids, attn = left_pad(prompts, self.pad_id, device)
        resp = batch.response_ids.to(device)
        full = torch.cat([ids, resp], dim=1)
        full_attn = torch.cat([attn, batch.response_mask.to(device).long()], dim=1)
        if not torch.equal(full[:, -n:], resp):
            raise TemplateError("response ids changed while building a view; views would not be aligned")
        # Positions count real tokens only, so left padding never shifts a view.
        positions = (full_attn.cumsum(-1) - 1).clamp(min=0)
        with torch.set_grad_enabled(grad):
            out = model(input_ids=full, attention_mask=full_attn, position_ids=positions, logits_to_keep=n + 1, use_cache=False)
            logits = out.logits[:, :-1]
            if logits.shape[-1] < self.vocab_size:
                raise ValueError(f"model vocab {logits.shape[-1]} is smaller than the tokenizer's {self.vocab_size}")
            return logits[..., : self.vocab_size]


def check_template(tok: PreTrainedTokenizerBase) -> None:
    """Rollouts are sampled after the generation prompt; the template must agree that an
    assistant turn starts exactly there, or training and deployment would see different text."""
    probe = [{"role": "user", "content": "2+2?"}]
    head = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template(probe + [{"role": "assistant", "content": "4"}], tokenize=False)
    if not whole.startswith(head) or not whole[len(head):].startswith("4"):
        raise TemplateError(
            f"chat template of '{tok.name_or_path}': the generation prompt {head[-40:]!r} is not where the "
            "rendered assistant turn begins; response ids would differ between rollout and scoring"
        )
    if "2+2?" not in head:
        raise TemplateError(f"chat template of '{tok.name_or_path}' drops the user's content")
