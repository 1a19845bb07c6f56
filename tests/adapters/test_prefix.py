"""Views of one model over a shared prompt prefix: same logits and gradients as scoring each
view alone, on real tokenizers and HF model classes, with uneven prompts and padded responses."""
from __future__ import annotations

import random

import pytest
import torch

from mmdistill.adapters.prefix import can_share, score_views, shared_lengths
from mmdistill.adapters.scoring import Views
from mmdistill.adapters.text import TextAdapter
from mmdistill.core.batch import Batch
from mmdistill.core.views import VIEW_SPEC
from mmdistill.models.loading import load_model, set_checkpointing
from mmdistill.models.teachers import frozen_copy
from mmdistill.tasks.arith import make_samples
from tests.helpers import rollout_cfg

ALL = tuple(VIEW_SPEC)


def brute_lengths(prompts):
    out = []
    for rows in zip(*prompts):
        best = 0
        for n in range(min(map(len, rows))):  # every view keeps >= 1 token of its own
            if all(r[:n] == rows[0][:n] for r in rows):
                best = n
        out.append(best)
    return out


def test_shared_lengths_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        views, batch = rng.randint(1, 4), rng.randint(1, 5)
        base = [[rng.randint(0, 3) for _ in range(rng.randint(1, 8))] for _ in range(batch)]
        prompts = [[b[: rng.randint(0, len(b))] + [rng.randint(0, 3) for _ in range(rng.randint(1, 4))] for b in base]
                   for _ in range(views)]
        assert shared_lengths(prompts) == brute_lengths(prompts)


def test_shared_lengths_edge_cases():
    assert shared_lengths([[[1, 2, 3]], [[1, 2, 3]]]) == [2]  # identical prompts: the last token stays per view
    assert shared_lengths([[[1, 2]], [[3, 2]]]) == [0]
    assert shared_lengths([[[7]], [[7, 8, 9]]]) == [0]
    assert shared_lengths([[[1, 2, 3, 4]]]) == [3]


@pytest.fixture(scope="module")
def setup(cfg, tok):
    student = load_model(cfg.student, tok, seed=0)
    teacher = load_model(cfg.teacher.model, tok, seed=1).eval().requires_grad_(False)
    adapter = TextAdapter(tok, cfg.privileged, max_length=128)
    samples = make_samples(5, 0, digits=2)
    samples[1] = dict(samples[1], prompt=samples[1]["prompt"] + " Take care with each digit, please.")
    samples[3] = dict(samples[3], hint="")  # no p: its privileged views equal the plain one
    torch.manual_seed(0)
    roll = rollout_cfg(12)
    b = adapter.rollout(student, samples, roll)
    mask = b.response_mask.clone()
    mask[0, 5:] = False  # responses that ended early: right padding inside the batch
    mask[2, 1:] = False
    batch = Batch(b.response_ids.masked_fill(~mask, adapter.pad_id), mask, b.samples)
    return adapter, student, teacher, batch


def grads(student, logits, mask):
    student.zero_grad(set_to_none=True)
    (logits.float().log_softmax(-1).max(-1).values * mask).sum().backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_shared_views_equal_views_scored_alone(setup):
    adapter, student, teacher, batch = setup
    init = frozen_copy(student)  # the initial student: equal to the student until it trains
    shared = Views(adapter, batch, student, teacher, ALL, init=init)
    alone = Views(adapter, batch, student, teacher, ALL, share_prefix=False, init=init)
    m = batch.response_mask
    for name in ALL:
        a, b = shared[name], alone[name]
        assert a.shape == b.shape
        assert a.requires_grad == b.requires_grad == (name == "student")
        assert torch.allclose(a[m], b[m], atol=1e-5), name
    assert torch.allclose(shared["student_init_priv"][m], shared["student_priv"][m], atol=1e-5)
    assert not adapter.has_images(batch.samples)
    assert {"student_prefix", "teacher_prefix"} <= set(shared.seconds)  # the cache was really used
    assert "student_prefix" not in alone.seconds
    ga, gb = grads(student, shared["student"], m), grads(student, alone["student"], m)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5), k


def test_a_no_grad_view_does_not_leak_gradient_through_the_shared_prefix(setup):
    adapter, student, teacher, batch = setup
    views = Views(adapter, batch, student, teacher, ("student", "student_priv"))
    assert not views["student_priv"].requires_grad
    m = batch.response_mask
    ref = grads(student, views["student"], m)
    both = Views(adapter, batch, student, teacher, ("student", "student_priv"))
    student.zero_grad(set_to_none=True)
    ((both["student"].float().log_softmax(-1).max(-1).values * m).sum() + both["student_priv"].sum()).backward()
    for n, p in student.named_parameters():
        if n in ref:
            assert torch.allclose(p.grad, ref[n], atol=1e-6), n


def test_reading_a_view_scores_its_model_group_once(setup):
    adapter, student, teacher, batch = setup
    views = Views(adapter, batch, student, teacher, ("teacher_full", "teacher_partial", "student"))
    views["teacher_partial"]
    assert set(views.seconds) == {"teacher_prefix", "teacher_full", "teacher_partial"}
    views["student"]  # alone in its group: scored the ordinary way
    assert "student_prefix" not in views.seconds and "student" in views.seconds


def test_models_that_cannot_share_fall_back(setup):
    adapter, student, teacher, batch = setup
    assert can_share(teacher, grad=False) and can_share(student, grad=True)
    set_checkpointing(student, True)
    try:
        student.train()
        assert not can_share(student, grad=True)  # HF drops the cache under checkpointing
        views = Views(adapter, batch, student, teacher, ("student", "student_priv"))
        views["student"]
        assert "student_prefix" not in views.seconds
    finally:
        set_checkpointing(student, False)
    # one view: nothing to share
    assert score_views(adapter, teacher, batch, ["full"], [False], "teacher") == (None, {})


def test_rollouts_of_one_prompt_share_its_prefix_even_in_a_one_view_group(setup):
    adapter, student, teacher, _ = setup
    samples = make_samples(3, 1, digits=2)
    torch.manual_seed(1)
    roll = rollout_cfg(8, num_rollouts=3)
    batch = adapter.rollout(student, samples, roll)
    assert len(batch.samples) == 9 and len({id(s) for s in batch.samples}) == 3
    wanted = ("student", "teacher_plain", "teacher_full")
    shared = Views(adapter, batch, student, teacher, wanted)
    alone = Views(adapter, batch, student, teacher, wanted, share_prefix=False)
    for name in wanted:
        assert torch.allclose(shared[name], alone[name], atol=1e-5), name
    assert {"student_prefix", "teacher_prefix"} <= set(shared.seconds)
    m = batch.response_mask
    ga, gb = grads(student, shared["student"], m), grads(student, alone["student"], m)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5), k
    single = Views(adapter, setup[3], student, teacher, ("student",))
    single["student"]
    assert "student_prefix" not in single.seconds  # distinct prompts, one view: nothing to share
