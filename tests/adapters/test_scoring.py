"""Views with a served teacher: its requests leave when the step's views are made (the student's
forwards run while the server works), the view the method reads is the server's top-k aligned with
the batch, and a sample with images is refused in one line."""
from __future__ import annotations

import time

import pytest
import torch

from mmdistill.adapters.scoring import Views
from mmdistill.core.batch import Batch, SparseLogProbs
from mmdistill.models.served import ServedTeacher
from tests.models.test_served import StandIn, lp_of


class PromptsOnly:
    """The two things Views asks an adapter for a served teacher's view."""

    def __init__(self, images: bool = False):
        self.images, self.asked = images, []

    def has_images(self, samples):
        return self.images

    def prompt_ids(self, samples, level, policy):
        self.asked.append((level, policy))
        return [[10 + i, 11] for i in range(len(samples))]


def batch() -> Batch:
    ids = torch.tensor([[3, 4, 5], [6, 0, 0]])
    return Batch(response_ids=ids, response_mask=ids > 0, samples=[{}, {}])


def test_requests_leave_when_the_views_are_made_and_come_back_aligned():
    server = StandIn(delay=0.3)
    try:
        adapter = PromptsOnly()
        teacher = ServedTeacher(server.url, model="m", topk=3, concurrency=2)
        t0 = time.perf_counter()
        views = Views(adapter, batch(), student=None, teacher=teacher, wanted=("student", "teacher_full"))
        assert time.perf_counter() - t0 < 0.2 and adapter.asked == [("full", "teacher")]
        time.sleep(0.5)  # the student's forward would run here
        assert len(server.requests) == 2
        t0 = time.perf_counter()
        got = views["teacher_full"]
        assert time.perf_counter() - t0 < 0.2  # already answered: the step waited for nothing
        assert isinstance(got, SparseLogProbs) and got.sampled.shape == (2, 3)
        assert got.sampled[0].tolist() == pytest.approx([lp_of(2, 3), lp_of(3, 4), lp_of(4, 5)])
        assert got.sampled[1, 0].item() == pytest.approx(lp_of(2, 6)) and bool((got.ids[1, 1:] == -1).all())
    finally:
        server.close()


def test_a_sample_with_images_is_refused():
    teacher = ServedTeacher("http://127.0.0.1:9", model="m")
    with pytest.raises(ValueError, match="teacher.mode=served scores text prompts only"):
        Views(PromptsOnly(images=True), batch(), student=None, teacher=teacher, wanted=("teacher_plain",))
