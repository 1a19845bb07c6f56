"""teacher.mode=served in the config: what a served teacher's top-k cannot give is refused in one
line naming the method and the key, before anything loads; what it can give passes; a server that
is down is one line naming its URL, from the preflight, before any model loads."""
from __future__ import annotations

import socket

import pytest

from mmdistill.config import ConfigError, check_paths, load_config
from mmdistill.models.served import ServedError
from mmdistill.training.export import model_card
from mmdistill.training.preflight import preflight
from tests.config.test_config import config_error

SERVED = ["teacher.mode=served", "teacher.server.url=http://127.0.0.1:9"]


@pytest.mark.parametrize("overrides, expected", [
    (["method=opd", "method.opd.estimator=full"],
     "method.opd.estimator=full needs the teacher's full vocabulary, which teacher.mode=served does not return: "
     "use estimator sampled or topk, or set teacher.server.full_vocabulary=tail"),
    (["method=full_opd", "method.full_opd.estimator=topk", "method.full_opd.topk_from=teacher"],
     "method.full_opd.topk=128 is more than the served teacher's teacher.server.topk=20"),
    (["method=opd", "method.opd.estimator=topk", "method.opd.topk=8"],
     "method.opd.topk_from=student needs the teacher's log-probs on the student's top-K ids"),
    (["method=dopd", "method.dopd.topk=8", "method.dopd.topk_from=teacher"],
     "method dopd's HT term (method.dopd.ht_divergence=reverse_kl, in method.dopd.regimes) needs the teacher's full "
     "vocabulary"),
    (["method=dopd", "method.dopd.topk=8", "teacher.server.full_vocabulary=tail"],
     "method.dopd.topk_from=student"),
    (["method=dopd", "method.dopd.self_mix=0.5", "teacher.server.full_vocabulary=tail"],
     "method.dopd.self_mix=0.5 mixes the teacher's full vocabulary into the self target"),
    (["method=gkd"], "method gkd's generalized JSD (method.name=gkd) needs the teacher's full vocabulary"),
    (["method=ar_opd"], "method ar_opd builds its target from the full vocabulary of two teacher views"),
    (["method=opd", "method.opd.estimator=sampled", "eval.model=teacher"], "config key 'eval.model' is 'teacher'"),
    (["method=opd", "method.opd.estimator=sampled", "train.fsdp_teacher=true"], "config key 'train.fsdp_teacher'"),
])
def test_what_a_top_k_cannot_give_is_refused_in_one_line(overrides, expected):
    assert expected in config_error(None, SERVED + overrides)


@pytest.mark.parametrize("overrides", [
    ["method=opd", "method.opd.estimator=sampled"],
    ["method=full_opd", "method.full_opd.estimator=topk", "method.full_opd.topk=20",
     "method.full_opd.topk_from=teacher"],
    ["method=opd", "method.opd.estimator=full", "teacher.server.full_vocabulary=tail"],
    ["method=opd", "method.opd.target=student_priv"],  # no teacher view at all
    ["method=dopd", "method.dopd.topk=8", "method.dopd.topk_from=teacher", "method.dopd.regimes=[lh,hs,ll]"],
    ["method=dopd", "method.dopd.topk=8", "method.dopd.topk_from=teacher", "teacher.server.full_vocabulary=tail"],
    ["method=gkd", "teacher.server.full_vocabulary=tail"],
    ["method=sft"],
])
def test_what_a_top_k_can_give_passes(overrides):
    load_config(None, SERVED + overrides)


@pytest.mark.parametrize("url", ["null", "localhost:8000", "ftp://x"])
def test_the_url_is_checked(url):
    assert "config key 'teacher.server.url'" in config_error(None, ["teacher.mode=served", f"teacher.server.url={url}",
                                                                    "method.opd.estimator=sampled"])


def test_a_server_that_is_down_is_one_line_from_the_preflight():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("tiny", ["teacher.mode=served", f"teacher.server.url=http://127.0.0.1:{port}",
                               "teacher.server.retries=0", "method.opd.estimator=sampled"])
    with pytest.raises(ServedError, match=rf"^teacher server http://127.0.0.1:{port}/v1/models unreachable after 1 "
                                          r"tries \(timeout 120 s\): .*refused.*$"):
        preflight(cfg)


def test_a_local_tokenizer_path_is_checked_before_anything_loads(tmp_path):
    cfg = load_config("tiny", SERVED + ["method.opd.estimator=sampled",
                                        f"teacher.server.tokenizer={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="config key 'teacher.server.tokenizer': .* does not exist"):
        check_paths(cfg)


def test_the_model_card_names_the_served_teacher():
    cfg = load_config("tiny", SERVED + ["method.opd.estimator=sampled", "eval.num_samples=0"])
    assert ("| teacher | served at http://127.0.0.1:9 (vllm api, model the first it lists, top-20, full vocabulary: "
            "refuse) |") in model_card(cfg, {"steps": 2})
