"""The served-teacher client against servers that misbehave on purpose (a stand-in HTTP server in a
thread: vLLM's answer format, 5xx, garbage, silence, nothing listening). The real server, llama-cpp-
python's, is in test_served_llama_cpp.py."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mmdistill.models.served import PROBE, ServedError, ServedTeacher
from mmdistill.models.tokenizer import build_tokenizer


class StandIn:
    """An HTTP server whose answers the test sets: `script` is a list of (status, body or None)
    consumed one per request, the last repeated; body None answers vLLM's format for the prompt."""

    def __init__(self, script=((200, None),), delay: float = 0.0):
        self.script, self.delay, self.requests = list(script), delay, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append((self.path, body))
                status, answer = stand_in.script.pop(0) if len(stand_in.script) > 1 else stand_in.script[0]
                time.sleep(stand_in.delay)
                data = (answer if isinstance(answer, bytes) else
                        json.dumps(vllm_answer(body["prompt"], body["prompt_logprobs"]) if answer is None else answer)
                        .encode())
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def lp_of(position: int, token: int) -> float:
    """The stand-in model: a made-up log-prob for every (position, token)."""
    return -0.1 * ((position * 7 + token * 3) % 13) - 0.01 * token


def vllm_answer(prompt: list[int], k: int) -> dict:
    """vLLM's /v1/completions answer with prompt_logprobs: per position a dict keyed by token id,
    the top-k and the prompt's own token (with its rank), the first position None."""
    rows = [None]
    for i in range(1, len(prompt)):
        best = sorted(range(50), key=lambda t: -lp_of(i, t))[:k]
        row = {str(t): {"logprob": lp_of(i, t), "rank": r + 1, "decoded_token": f"t{t}"} for r, t in enumerate(best)}
        row.setdefault(str(prompt[i]), {"logprob": lp_of(i, prompt[i]), "rank": 99, "decoded_token": "x"})
        rows.append(row)
    return {"choices": [{"text": "!", "prompt_logprobs": rows}]}


@pytest.fixture
def stand_in(request):
    server = StandIn(*getattr(request, "param", ()))
    yield server
    server.close()


def client(url: str, **kw) -> ServedTeacher:
    return ServedTeacher(url, model="m", api="vllm", **{"topk": 3, "retries": 2, "backoff": 0.01, **kw})


def test_the_vllm_answer_is_read_aligned_with_the_response(stand_in):
    prompts, responses = [[5, 6, 7], [8, 9]], [[1, 40, 2], [3]]
    got = client(stand_in.url).submit(prompts, responses, width=4).result()
    assert got.ids.shape == (2, 4, 3) and got.sampled.shape == (2, 4)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        for j, y in enumerate(r):
            pos = len(p) + j
            assert got.sampled[b, j].item() == pytest.approx(lp_of(pos, y))
            best = sorted(range(50), key=lambda t: -lp_of(pos, t))[:3]
            assert got.ids[b, j].tolist() == best
            assert got.logprobs[b, j].tolist() == pytest.approx([lp_of(pos, t) for t in best])
        assert bool((got.ids[b, len(r):] == -1).all())  # padding
    path, body = stand_in.requests[0]
    assert path == "/v1/completions" and body["prompt"] in (prompts[0] + responses[0], prompts[1] + responses[1])
    assert body["prompt_logprobs"] == 3 and body["model"] == "m"


@pytest.mark.parametrize("stand_in", [([(503, {"error": "busy"}), (502, b"bad gateway"), (200, None)],)],
                         indirect=True)
def test_transient_errors_are_retried(stand_in):
    got = client(stand_in.url).submit([[1, 2]], [[3]], width=1).result()
    assert len(stand_in.requests) == 3 and got.sampled[0, 0].item() == pytest.approx(lp_of(2, 3))


@pytest.mark.parametrize("stand_in,expected", [
    (([(500, {"error": "boom"})],), r"teacher server http://127\.0\.0\.1:\d+/v1/completions answered HTTP 500 after 3 "
                                    r"tries: \{\"error\": \"boom\"\}"),
    (([(400, {"error": "max_logprobs is 2"})],), r"answered HTTP 400: .*max_logprobs is 2"),
    (([(200, b"<html>")],), r"/v1/completions answered something that is not JSON: b'<html>'"),
    (([(200, {"choices": [{"text": "x"}]})],), r"answered no choices\[0\]\.prompt_logprobs \(is it vLLM\?\)"),
    (([(200, {"choices": [{"prompt_logprobs": [None]}]})],), r"prompt_logprobs for 1 positions, sent 3"),
], indirect=["stand_in"])
def test_a_broken_answer_is_one_line_naming_the_url(stand_in, expected):
    with pytest.raises(ServedError, match=expected) as err:
        client(stand_in.url).submit([[1, 2]], [[3]], width=1).result()
    assert "\n" not in str(err.value) and stand_in.url in str(err.value)


def test_nothing_listening_is_one_line_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServedError, match=rf"teacher server http://127.0.0.1:{port}/v1/completions unreachable "
                                          r"after 3 tries \(timeout 120 s\): .*refused"):
        client(f"http://127.0.0.1:{port}").submit([[1]], [[2]], width=1).result()


@pytest.mark.parametrize("stand_in", [([(200, None)], 1.0)], indirect=True)
def test_a_silent_server_times_out(stand_in):
    t0 = time.perf_counter()
    with pytest.raises(ServedError, match=r"unreachable after 2 tries \(timeout 0.2 s\)"):
        client(stand_in.url, timeout=0.2, retries=1).submit([[1]], [[2]], width=1).result()
    assert time.perf_counter() - t0 < 1.5


@pytest.mark.parametrize("stand_in", [([(200, None)], 0.4)], indirect=True)
def test_requests_run_concurrently_and_submit_does_not_wait(stand_in):
    t0 = time.perf_counter()
    pending = client(stand_in.url, concurrency=4).submit([[1, 2]] * 4, [[3, 4]] * 4, width=2)
    assert time.perf_counter() - t0 < 0.2  # the step goes on meanwhile
    got = pending.result()
    assert time.perf_counter() - t0 < 1.0  # 4 x 0.4 s one after the other would be 1.6 s
    assert torch.equal(got.sampled[0], got.sampled[3])


@pytest.mark.parametrize("stand_in", [([(200, {"tokens": [1, 2, 3]})],)], indirect=True)
def test_a_server_with_another_vocabulary_is_refused(stand_in, tok):
    with pytest.raises(ServedError, match=r"tokenises a probe text as \[1, 2, 3\]\.\.\., the student's tokenizer as "
                                          r".*the two vocabularies differ"):
        client(stand_in.url).check_vocabulary(tok)
    assert stand_in.requests[0] == ("/tokenize", {"model": "m", "prompt": PROBE, "add_special_tokens": False})


@pytest.mark.parametrize("stand_in", [([(200, None)],)], indirect=True)
def test_the_same_vocabulary_passes(stand_in, tok):
    stand_in.script = [(200, {"tokens": tok(PROBE, add_special_tokens=False)["input_ids"]})]
    client(stand_in.url).check_vocabulary(tok)


@pytest.mark.parametrize("stand_in", [([(404, {"detail": "Not Found"})],)], indirect=True)
def test_without_a_tokenize_endpoint_a_local_tokenizer_is_compared(stand_in, tok, tmp_path):
    with pytest.raises(ServedError, match="has no tokenize endpoint .*set teacher.server.tokenizer"):
        client(stand_in.url).check_vocabulary(tok)
    client(stand_in.url).check_vocabulary(tok, tok)
    other = build_tokenizer(split_digits=False)
    with pytest.raises(ServedError, match="teacher.server.tokenizer's vocabulary differs from the student's"):
        client(stand_in.url).check_vocabulary(tok, other)
