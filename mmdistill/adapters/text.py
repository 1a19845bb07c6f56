"""Text adapter: any Hugging Face causal LM behind the token-level view interface.

Each view's input is its own prompt (plain, or with the privileged text spliced into the user
turn) followed by the SAME response token ids. The response is appended as ids, never
re-tokenised with the prompt, so every view predicts exactly the tokens the student sampled.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from mmdistill.core.batch import Batch
from mmdistill.models.decoding import Decoder
from mmdistill.models.weights import synced_generation


class TemplateError(ValueError):
    """A chat template that would make views disagree on the response."""


class ContextTooLong(ValueError):
    """A prompt that does not fit: we never cut the question or the privileged text."""


# Partial-view cut rules (privileged.partial_cut).
CUT_RULES = ("whitespace", "release")
# The release's "word" characters: \w (Unicode letters, digits, _) and the backslash, so a LaTeX
# command (\frac) is never split, while any other punctuation ends a word.
_RELEASE_WORD = re.compile(r"[\w\\]")


def cut_prefix(text: str, ratio: float, rule: str = "whitespace") -> str:
    """The first `ratio` of `text`'s characters, extended so that no word is cut in two.

    Texts of two words or fewer are kept whole: cutting them leaves nothing usable.
    rule "whitespace": the cut moves on to the next whitespace, so a number, formula or
    punctuated token ("3.14", "x^2+1,") stays whole; ratio 0 gives "" (the view keeps nothing of
    the field). rule "release": the AR-OPD release's cut, for reproducing it: the text is stripped
    first, at least one character is kept (ratio 0 gives the first character and the word
    characters right after it), and the cut moves on
    only through word characters and backslashes, so a cut can leave "x = 3." of "x = 3.14" or
    "\\frac{" of "\\frac{1}{2}", fragments the whitespace rule never makes.
    """
    if rule == "release":
        return _cut_release(text, ratio)
    if rule != "whitespace":
        raise ValueError(f"rule must be one of {list(CUT_RULES)}, got {rule!r}")
    if len(text.split()) <= 2 or ratio >= 1.0:
        return text
    n = math.ceil(ratio * len(text))
    if n <= 0:
        return ""
    while n < len(text) and not text[n].isspace() and not text[n - 1].isspace():
        n += 1
    return text[:n].rstrip()


def _cut_release(text: str, ratio: float) -> str:
    text = text.strip()
    if ratio >= 1.0 or len(text.split()) <= 2:
        return text
    n = max(1, math.ceil(ratio * len(text)))
    if n >= len(text):
        return text

    def word(i: int) -> bool:
        return _RELEASE_WORD.match(text[i]) is not None

    if word(n - 1) and word(n):
        while n < len(text) and word(n):
            n += 1
    return text[:n].rstrip()  # never empty: text[0] is not whitespace after the strip


def response_mask(ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including each row's first EOS (all True if it never stopped)."""
    is_eos = torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # One tensor from padded lists: one per row took twice as long (32 rows: 0.45 against 0.2 ms).
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), attn.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


@dataclass
class Prompts:
    """Left-padded prompt ids of one view, plus whatever else the model reads (pixels...)."""

    ids: torch.Tensor
    attn: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def unpadded(self) -> list[list[int]]:
        return [[t for t, m in zip(row, mask) if m] for row, mask in zip(self.ids.tolist(), self.attn.tolist())]


class _Settings(dict):
    """A plain copy of a config group, read by attribute. OmegaConf's attribute access costs
    tens of microseconds, and the adapter reads these settings per sample and per view."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _settings(group: Any) -> _Settings:
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(group, resolve=True) if isinstance(group, DictConfig) else dict(group)
    return _Settings({k: _settings(v) if isinstance(v, dict) else v for k, v in plain.items()})


class TextAdapter:
    """Builds each view's prompt from a sample record and scores responses under it.

    A sample holds the task as `prompt` (one user turn) or `messages` (a chat), an optional
    `system`, and privileged fields (`hint`, `reasoning`, `answer`, ...) that
    `privileged.text` formats into p. An empty p gives the plain prompt, so `student_priv`
    then equals `student` exactly.

    `teacher` is the teacher's own tokenizer (or processor) when it renders prompts
    differently; both must share the vocabulary, since views are compared id by id.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, privileged: Any, max_length: int, teacher: Any = None):
        self.procs = {"student": tokenizer, "teacher": tokenizer if teacher is None else teacher}
        self.tok = getattr(tokenizer, "tokenizer", tokenizer)
        self.priv = _settings(privileged)
        self.prompt_share = float(privileged.get("prompt_share", 0.0) or 0.0)
        self.max_length = max_length
        self.vocab_size = len(self.tok)
        self.pad_id = self.tok.pad_token_id
        self.eos_ids = sorted({self.tok.eos_token_id})
        self.never_sample: list[int] = []  # ids a response must not hold (a VLM's image tokens)
        self.decoder = Decoder()
        for proc in {id(p): p for p in self.procs.values()}.values():
            check_template(proc)

    # -- prompts ---------------------------------------------------------------------------

    def fields(self, sample: dict, level: str | None) -> dict:
        """The sample's fields as `privileged.text` sees them at this level."""
        fields = dict(sample)
        if level == "partial":
            if self.priv.partial_field not in sample:
                raise KeyError(f"sample '{sample.get('id', '?')}' has no field '{self.priv.partial_field}' that the "
                               "partial view cuts (privileged.partial_field)")
            fields[self.priv.partial_field] = cut_prefix(sample[self.priv.partial_field], self.priv.partial_ratio,
                                                         self.priv.partial_cut)
        return fields

    def privileged_text(self, sample: dict, level: str | None) -> str:
        if level is None:
            return ""
        fields = self.fields(sample, level)
        try:
            return self.priv.text.format_map(fields).strip()
        except KeyError as exc:
            raise KeyError(f"sample '{sample.get('id', '?')}' has no field {exc} needed by privileged.text") from None

    def view_level(self, sample: dict, level: str | None) -> str | None:
        """privileged.prompt_share promotes a fixed share of samples' plain view to the full one."""
        if level is None and self.prompt_share > 0:
            digest = hashlib.sha256(str(sample.get("id", "")).encode()).digest()
            if int.from_bytes(digest[:4], "big") / 2**32 < self.prompt_share:
                return "full"
        return level

    @contextlib.contextmanager
    def deployed(self):
        """Scores the student as deployed: prompt_share teaches an SFT student to read p, but
        no plain prompt at evaluation may carry it."""
        share, self.prompt_share = self.prompt_share, 0.0
        try:
            yield self
        finally:
            self.prompt_share = share

    def messages(self, sample: dict, level: str | None) -> list[dict]:
        level = self.view_level(sample, level)
        if "messages" in sample:
            msgs = [dict(m) for m in sample["messages"]]
        else:
            msgs = [{"role": "user", "content": self._field(sample, "prompt")}]
        if sample.get("system"):
            msgs.insert(0, {"role": "system", "content": sample["system"]})
        p = self.privileged_text(sample, level)
        if p:
            last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[last_user]["content"] = splice(msgs[last_user]["content"], self.priv.template, p)
        return msgs

    def prompt_texts(self, samples: list[dict], level: str | None, policy: str = "student") -> list[str]:
        proc = self.procs[policy]
        texts = [proc.apply_chat_template(self.messages(s, level), add_generation_prompt=True, tokenize=False)
                 for s in samples]
        if level is not None:
            plain = self.prompt_texts(samples, None, policy)
            for s, a, b in zip(samples, texts, plain):
                if a == b and self.privileged_text(s, level):
                    raise TemplateError(
                        f"sample '{s.get('id', '?')}': the chat template dropped the privileged text "
                        "(privileged and plain prompts are identical)"
                    )
        return texts

    def prompt_ids(self, samples: list[dict], level: str | None, policy: str = "student") -> list[list[int]]:
        return self.tok(self.prompt_texts(samples, level, policy), add_special_tokens=False)["input_ids"]

    def encode(self, samples: list[dict], level: str | None, policy: str, device: torch.device) -> Prompts:
        ids, attn = left_pad(self.prompt_ids(samples, level, policy), self.pad_id, device)
        return Prompts(ids, attn)

    def prepare(self, samples: list[dict]) -> list[dict]:
        """Samples as the views read them (the vision adapter decodes images here, once)."""
        return samples

    def has_images(self, samples: list[dict]) -> bool:
        """Whether any view of these samples puts an image into its prompt."""
        return False

    def _field(self, sample: dict, name: str) -> str:
        if name not in sample:
            raise KeyError(f"sample '{sample.get('id', '?')}' has no field '{name}'")
        return sample[name]

    def check_fits(self, samples: list[dict], prompts: Prompts, response_lens: int | list[int], what: str) -> None:
        if isinstance(response_lens, int):
            response_lens = [response_lens] * len(samples)
        for s, n, response_len in zip(samples, prompts.attn.sum(1).tolist(), response_lens):
            if self.max_length and n + response_len > self.max_length:
                raise ContextTooLong(
                    f"sample '{s.get('id', '?')}': {what} prompt of {n} tokens + {response_len} response "
                    f"tokens exceeds the context of {self.max_length} (raise train.max_length or shorten the sample)"
                )

    # -- responses -------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, samples: list[dict], cfg: Any, level: str | None = None,
                policy: str = "student") -> Batch:
        """Sample from the student WITHOUT privileged information (KV-cached `generate`; compiled
        over a static cache where rollout.fast allows, models/decoding.py).

        `level`/`policy` sample another view instead (evaluation's privileged-teacher row)."""
        samples = self.prepare([s for s in samples for _ in range(cfg.num_rollouts)])
        device = next(model.parameters()).device
        prompts = self.encode(samples, level, policy, device)
        self.check_fits(samples, prompts, cfg.max_new_tokens, policy if level is None else f"{policy} privileged")
        greedy = cfg.temperature == 0
        gen = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else cfg.temperature,
            top_p=None if greedy else cfg.top_p,
            top_k=None if greedy else 0,
            suppress_tokens=self.never_sample or None,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            use_cache=True,
        )
        was_training = model.training
        model.eval()
        try:
            synced = {"synced_gpus": True} if synced_generation(model) else {}
            out = self.decoder.generate(model, getattr(cfg, "fast", "auto"), prompts.ids, prompts.attn, gen,
                                        sampler=getattr(cfg, "sampler", "auto"), loop=getattr(cfg, "loop", "auto"),
                                        **model_inputs(model, prompts.extras), **synced)
        finally:
            model.train(was_training)
        resp = out[:, prompts.ids.shape[1]:]
        if resp.shape[1] == 0:  # max_new_tokens reached nothing? generate always yields >= 1
            raise RuntimeError("generate returned no tokens")
        mask = response_mask(resp, self.eos_ids)
        return Batch(resp.masked_fill(~mask, self.pad_id), mask, samples, on_policy=True)

    def oracle_batch(self, samples: list[dict]) -> Batch:
        """Reference responses (for SFT and off-policy mixing), ending with EOS like a rollout."""
        samples = self.prepare(samples)
        resp = self.tok([self._field(s, "response") for s in samples], add_special_tokens=False)["input_ids"]
        resp = [r + [self.eos_ids[0]] for r in resp]
        self.check_fits(samples, self.encode(samples, None, "student", torch.device("cpu")), [len(r) for r in resp],
                        "student")
        ids, mask = right_pad(resp, self.pad_id, torch.device("cpu"))
        return Batch(ids, mask, samples, on_policy=False)

    # -- scoring ---------------------------------------------------------------------------

    def logits(self, model: torch.nn.Module, batch: Batch, level: str | None, grad: bool,
               policy: str = "student") -> torch.Tensor:
        """[B, N, V] next-token logits (model dtype) at each response position under this view.

        Logits, not log-probs: methods normalise them chunk by chunk in float32 (chunked.py), so
        no [B, N, V] float32 copy is made per view.
        """
        device = next(model.parameters()).device
        prompts = self.encode(batch.samples, level, policy, device)
        n = batch.response_ids.shape[1]
        self.check_fits(batch.samples, prompts, n, "scored")
        resp = batch.response_ids.to(device)
        full = torch.cat([prompts.ids, resp], dim=1)
        full_attn = torch.cat([prompts.attn, batch.response_mask.to(device).long()], dim=1)
        if not torch.equal(full[:, -n:], resp):
            raise TemplateError("response ids changed while building a view; views would not be aligned")
        extras = {k: extend_over(v, prompts.ids, n) for k, v in prompts.extras.items()}
        with torch.set_grad_enabled(grad):
            out = model(input_ids=full, attention_mask=full_attn, position_ids=positions(model, full_attn),
                        **model_inputs(model, extras), logits_to_keep=n + 1, use_cache=False)
            return self.vocab_logits(out.logits[:, :-1])

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The tokenizer's ids only (models pad their embedding rows past it)."""
        if logits.shape[-1] < self.vocab_size:
            raise ValueError(f"model vocab {logits.shape[-1]} is smaller than the tokenizer's {self.vocab_size}")
        return logits[..., : self.vocab_size]


def splice(content: Any, template: str, privileged: str) -> Any:
    """The user turn with p spliced in; in a multimodal turn, into its last text part."""
    if isinstance(content, str):
        return template.format(prompt=content, privileged=privileged)
    parts = [dict(p) for p in content]
    texts = [i for i, p in enumerate(parts) if p.get("type") == "text"]
    if not texts:
        return [*parts, {"type": "text", "text": template.format(prompt="", privileged=privileged).strip()}]
    parts[texts[-1]]["text"] = template.format(prompt=parts[texts[-1]]["text"], privileged=privileged)
    return parts


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model)


def uses_model_positions(model: torch.nn.Module) -> bool:
    """Models with multimodal rotary positions (Qwen-VL) derive them from the ids, image grids
    and attention mask themselves; 1-D positions would be wrong for them."""
    model = unwrap(model)
    inner = getattr(model, "model", None)
    return hasattr(model, "get_rope_index") or hasattr(inner, "get_rope_index")


def positions(model: torch.nn.Module, attn: torch.Tensor) -> torch.Tensor | None:
    """Positions that count real tokens only, so left padding never shifts a view."""
    if uses_model_positions(model):
        return None
    return (attn.cumsum(-1) - 1).clamp(min=0)


def extend_over(value: Any, prompt_ids: torch.Tensor, n: int) -> Any:
    """Per-token prompt inputs (Qwen-VL's mm_token_type_ids) extended over the response as
    text tokens (0), as generate extends them while it samples."""
    if not torch.is_tensor(value) or value.shape != prompt_ids.shape:
        return value
    return torch.cat([value, value.new_zeros(value.shape[0], n)], dim=1)


def model_inputs(model: torch.nn.Module, extras: dict[str, Any]) -> dict[str, Any]:
    """Extra inputs on the model's device; pixels in its dtype."""
    param = next(model.parameters())
    return {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
            for k, v in extras.items()}


def check_template(tok: Any) -> None:
    """Rollouts are sampled after the generation prompt; the template must agree that an
    assistant turn starts exactly there, or training and deployment would see different text.
    `tok` is a tokenizer or a processor (anything with a chat template)."""
    text = isinstance(tok, PreTrainedTokenizerBase)  # processors get multimodal parts, as in training
    probe = [{"role": "user", "content": "2+2?" if text else [{"type": "text", "text": "2+2?"}]}]
    answer = {"role": "assistant", "content": "4" if text else [{"type": "text", "text": "4"}]}
    head = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template(probe + [answer], tokenize=False)
    if not whole.startswith(head) or not whole[len(head):].startswith("4"):
        raise TemplateError(
            f"chat template of '{_name(tok)}': the generation prompt {head[-40:]!r} is not where the "
            "rendered assistant turn begins; response ids would differ between rollout and scoring"
        )
    if "2+2?" not in head:
        raise TemplateError(f"chat template of '{_name(tok)}' drops the user's content")


def _name(proc: Any) -> str:
    return (getattr(proc, "name_or_path", None)
            or getattr(getattr(proc, "tokenizer", None), "name_or_path", type(proc).__name__))
