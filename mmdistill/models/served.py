"""A teacher behind an OpenAI-compatible completions server (vLLM, llama-cpp-python's server).

At the scale the papers work at the teacher does not fit beside the student: it is served on other
machines. What the methods need from it is the log-prob of each sampled token and the top-k of each
response position, aligned with the rollout exactly, so the prompt goes out as the teacher view's
token ids followed by the sampled ids, never as text to be tokenised again.

api "vllm": one request per sequence, the ids as the prompt, `prompt_logprobs=k`; vLLM answers with
a dict per prompt position keyed by token id (the prompt's own token always among them).

api "llama_cpp": llama-cpp-python's server takes text only, keys its top-k by token text, and its
echoed prompt log-probs are read one position late, so mmdistill asks position by position: the
prefix's text with `logit_bias` forcing the sampled token, whose log-prob (taken before the bias)
comes back with the row's top-k. The text must read back as the same ids (checked through
/extras/tokenize per sequence); a top-k text that several ids share is left out (id -1). An
end-of-generation token is never returned as a completion, so for it the bias points the other way
and its log-prob is read from the top-k under its text. One request per response token: a check and
small-model path, not a training one.

Requests run on a thread pool (`concurrency` in flight), each with a timeout and retried on
transient failures (HTTP 408/429/5xx, refused or reset connections, timeouts); anything else is
one line naming the URL.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoTokenizer

from mmdistill.core.batch import SparseLogProbs

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
APIS = ("vllm", "llama_cpp")
# Tokenised on both sides to check that the server holds the student's vocabulary.
PROBE = "Distil 12 + 30 = 42, naïve café — 日本語 ✓\n  x_{n}^2"


class ServedError(OSError):
    """A served teacher failed: unreachable, an HTTP error, or an answer mmdistill cannot read
    (an OSError: the CLI reports it in one line, like a missing file)."""


class ServedTeacher:
    """Scores views on a completions server; `submit` returns at once (the step goes on with the
    student's forward while the requests run)."""

    def __init__(self, url: str, model: str | None = None, api: str = "vllm", topk: int = 20, concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 3, tokenizer: Any = None, backoff: float = 0.5):
        if api not in APIS:
            raise ValueError(f"api must be one of {list(APIS)}, got {api!r}")
        self.url, self.api, self.topk = url.rstrip("/"), api, int(topk)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=int(concurrency), thread_name_prefix="served-teacher")
        self._tok = tokenizer
        self._texts: list[str] | None = None  # llama_cpp: the text llama.cpp gives each id
        self._by_text: dict[str, list[int]] = {}
        self._eog: set[int] = set()
        if api == "llama_cpp":
            if tokenizer is None:
                raise ValueError("api llama_cpp needs the student's tokenizer (the server takes text)")
            self._build_text_table(tokenizer)

    # ------------------------------------------------------------ HTTP

    def _request(self, path: str, body: dict | None) -> Any:
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace").replace("\n", " ")
                if e.code in TRANSIENT_STATUS and not last:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise ServedError(f"teacher server {url} answered HTTP {e.code}"
                                  f"{f' after {attempt + 1} tries' if attempt else ''}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                    http.client.HTTPException) as e:
                if not last:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                reason = getattr(e, "reason", None) or e.__class__.__name__
                raise ServedError(f"teacher server {url} unreachable after {attempt + 1} tries "
                                  f"(timeout {self.timeout:g} s): {reason}") from None
            try:
                return json.loads(raw)
            except ValueError:
                raise ServedError(f"teacher server {url} answered something that is not JSON: {raw[:120]!r}") from None
        raise AssertionError("unreachable")

    @property
    def model(self) -> str:
        """The server's model name: the configured one, else the first the server lists."""
        if self._model is None:
            listed = self._request("/v1/models", None)
            try:
                self._model = str(listed["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise ServedError(f"teacher server {self.url}/v1/models lists no model: {str(listed)[:120]}") from None
        return self._model

    # ------------------------------------------------------------ vocabulary

    def server_tokenize(self, text: str) -> list[int] | None:
        """The server's ids for `text`, or None where it has no tokenize endpoint."""
        path, body = (("/extras/tokenize", {"input": text}) if self.api == "llama_cpp"
                      else ("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}))
        try:
            got = self._request(path, body)
        except ServedError as e:
            if " 404" in str(e) or " 405" in str(e):
                return None
            raise
        tokens = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(tokens, list):
            raise ServedError(f"teacher server {self.url}{path} answered without a token list: {str(got)[:120]}")
        return [int(t) for t in tokens]

    def check_vocabulary(self, student_tok, local_tok=None) -> None:
        """The server must read the student's ids as the student does: the same ids for a probe text
        (its tokenize endpoint), else the same vocabulary in `local_tok` (teacher.server.tokenizer)."""
        ids = self.server_tokenize(PROBE)
        if ids is None:
            if local_tok is None:
                raise ServedError(f"teacher server {self.url} has no tokenize endpoint to check the vocabulary "
                                  "against the student's: set teacher.server.tokenizer to the served model's tokenizer")
            if local_tok.get_vocab() != student_tok.get_vocab():
                raise ServedError("teacher.server.tokenizer's vocabulary differs from the student's")
            return
        mine = student_tok(PROBE, add_special_tokens=False)["input_ids"]
        if ids != mine:
            raise ServedError(f"teacher server {self.url} tokenises a probe text as {ids[:12]}..., the student's "
                              f"tokenizer as {mine[:12]}...: the two vocabularies differ")

    def _build_text_table(self, tok) -> None:
        """id -> the text llama.cpp gives it (special tokens empty, bytes of a split character dropped)."""
        special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                                              if getattr(t, "special", False)}
        texts = []
        for i in range(len(tok)):
            texts.append("" if i in special else
                         tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                         .replace("\ufffd", ""))
        self._texts = texts
        for i, t in enumerate(texts):
            self._by_text.setdefault(t, []).append(i)
        eos = tok.eos_token_id
        self._eog = {eos} if isinstance(eos, int) else set(eos or [])

    # ------------------------------------------------------------ scoring

    def submit(self, prompts: list[list[int]], responses: list[list[int]], width: int) -> "Pending":
        """Start scoring each response after its prompt; the result is [B, width] SparseLogProbs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        one = self._score_vllm if self.api == "vllm" else self._score_llama_cpp
        return Pending([self._pool.submit(one, list(p), list(r)) for p, r in zip(prompts, responses)], width,
                       self.topk)

    def _malformed(self, what: str, got: Any) -> ServedError:
        return ServedError(f"teacher server {self.url}/v1/completions answered {what}: {str(got)[:160]}")

    def _score_vllm(self, prompt: list[int], response: list[int]):
        body = {"model": self.model, "prompt": prompt + response, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.topk}
        out = self._request("/v1/completions", body)
        try:
            rows = out["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise self._malformed("no choices[0].prompt_logprobs (is it vLLM?)", out) from None
        if not isinstance(rows, list) or len(rows) != len(prompt) + len(response):
            raise self._malformed(f"prompt_logprobs for {len(rows) if isinstance(rows, list) else '?'} positions, "
                                  f"sent {len(prompt) + len(response)}", rows)
        sampled, tops = [], []
        for j, y in enumerate(response):
            row = rows[len(prompt) + j]
            try:
                entries = [(int(i), float(v["logprob"] if isinstance(v, dict) else v)) for i, v in row.items()]
                sampled.append(dict(entries)[y])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise self._malformed(f"a position without the log-prob of its token {y}", row) from None
            tops.append(sorted(entries, key=lambda e: -e[1])[: self.topk])
        return sampled, tops

    def _score_llama_cpp(self, prompt: list[int], response: list[int]):
        ids = prompt + response
        text = self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        back = self.server_tokenize(text)
        if back != ids:
            raise ServedError(f"teacher server {self.url} reads the text of a sequence back as other token ids "
                              f"(first difference at {_first_difference(back or [], ids)}): llama-cpp-python's server "
                              "takes text, not ids; a server that takes ids (teacher.server.api=vllm) scores any "
                              "rollout")
        sampled, tops = [], []
        for j, y in enumerate(response):
            prefix = self._tok.decode(ids[: len(prompt) + j], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
            lp, top = self._position(prefix, y, self.topk)
            sampled.append(lp)
            tops.append(top)
        return sampled, tops

    def _ask(self, prefix: str, y: int, eog: bool, n: int) -> tuple[dict[str, float], str, float]:
        """One position's row: its top-n by text (in rank order) and the generated token."""
        body = {"model": self.model, "prompt": prefix, "max_tokens": 1, "temperature": 0.0, "logprobs": n,
                "logit_bias": {str(y): -100.0 if eog else 100.0}}
        out = self._request("/v1/completions", body)
        try:
            lp = out["choices"][0]["logprobs"]
            top = {str(t): float(v) for t, v in lp["top_logprobs"][0].items()}
            return top, lp["tokens"][0], float(lp["token_logprobs"][0])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise self._malformed("no logprobs for the forced token", out) from None

    def _position(self, prefix: str, y: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """(log q(y), the top-k as (id, log-prob)) at the position after `prefix`.

        An end token is never returned as a completion: it is biased away instead, and its log-prob
        read from the top-n under its text. Several ids share an empty text (special tokens, bytes of
        a split character) and the server keeps the last of them, so n is first widened until the
        text appears, then cut to its first rank, where the value is the best-ranked of them: the end
        token, unless another empty-text id outranks it."""
        eog = y in self._eog
        top, gen_text, gen_lp = self._ask(prefix, y, eog, k)
        text = self._texts[y]
        if not eog:
            if gen_text != text:
                raise ServedError(f"teacher server {self.url} generated {gen_text!r} where logit_bias forced "
                                  f"token {y} ({text!r})")
            sampled = gen_lp
        else:
            wide, n = top, k
            while text not in wide:
                if n >= len(self._texts):
                    raise ServedError(f"teacher server {self.url} gave no log-prob for end token {y} over the "
                                      "whole vocabulary")
                n = min(len(self._texts), n * 10)
                wide = self._ask(prefix, y, eog, n)[0]
            rank = list(wide).index(text) + 1
            sampled = self._ask(prefix, y, eog, rank)[0][text] if rank < len(wide) else wide[text]
        named = []
        for t, v in top.items():
            if not eog and t == self._texts[y]:
                named.append((y, v))
            elif eog and t == self._texts[y]:
                named.append((y if len(self._by_text.get(t, ())) == 1 else -1, v))
            else:
                owners = self._by_text.get(t, ())
                named.append((owners[0] if len(owners) == 1 else -1, v))
        named.sort(key=lambda e: -e[1])
        return sampled, named[:k]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def served_teacher(server: Any, student_tok) -> ServedTeacher:
    """The client for config group teacher.server, its vocabulary checked against the student's."""
    local = None
    if server.tokenizer:
        local = AutoTokenizer.from_pretrained(server.tokenizer)
    teacher = ServedTeacher(server.url, server.model, server.api, server.topk, server.concurrency, server.timeout,
                            server.retries, tokenizer=student_tok)
    teacher.check_vocabulary(student_tok, local)
    return teacher


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, z) in enumerate(zip(a, b)) if x != z), min(len(a), len(b)))


class Pending:
    """The futures of one view's requests; `result` packs them into [B, width] SparseLogProbs."""

    def __init__(self, futures: list[Future], width: int, k: int):
        self.futures, self.width, self.k = futures, width, k

    def result(self) -> SparseLogProbs:
        b = len(self.futures)
        sampled = torch.zeros(b, self.width, dtype=torch.float32)
        ids = torch.full((b, self.width, self.k), -1, dtype=torch.long)
        lps = torch.full((b, self.width, self.k), float("-inf"), dtype=torch.float32)
        for i, f in enumerate(self.futures):
            row_sampled, row_tops = f.result()
            for j, (s, top) in enumerate(zip(row_sampled, row_tops)):
                sampled[i, j] = s
                for r, (t, v) in enumerate(top):
                    if t >= 0:
                        ids[i, j, r], lps[i, j, r] = t, v
        # entries whose id is unknown (-1) sort after the named ones: the first K are the best named K
        order = torch.sort(lps, dim=-1, descending=True, stable=True).indices
        return SparseLogProbs(sampled, ids.gather(-1, order), lps.gather(-1, order))
