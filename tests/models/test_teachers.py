"""Teacher modes: a separate frozen model, a frozen copy of the student, an EMA, the live student."""
from __future__ import annotations

import copy

import pytest
import torch

from mmdistill.models.loading import load_model
from mmdistill.models.teachers import Teacher, frozen_copy

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def base_student(cfg, tok):
    return load_model(cfg.student, tok, seed=0), tok


@pytest.fixture
def student(base_student):
    model = copy.deepcopy(base_student[0])
    model.train()
    return model


@pytest.fixture(scope="module")
def teacher_model(cfg, base_student):
    return load_model(cfg.teacher.model, base_student[1], seed=1)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def perturb(model, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------------- model


def test_model_mode_is_frozen(student, teacher_model):
    t = Teacher("model", student, copy.deepcopy(teacher_model))
    assert t.model is not student
    params = list(t.model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not t.model.training
    assert t.model.config.hidden_size == 48  # the teacher's own architecture, not the student's
    assert not t.owns_weights and t.state_dict() == {}
    before = snapshot(t.model)
    t.update(student.parameters())  # no-op outside ema
    assert same_weights(before, snapshot(t.model))


def test_model_mode_grads_do_not_reach_teacher(student, teacher_model):
    t = Teacher("model", student, copy.deepcopy(teacher_model))
    ids = torch.randint(0, 100, (2, 6))
    assert not t.model(input_ids=ids).logits.requires_grad  # nothing to back-propagate into


def test_model_mode_keeps_an_already_frozen_model(student, teacher_model):
    frozen = frozen_copy(teacher_model)
    t = Teacher("model", student, frozen)
    assert t.model is frozen  # no needless second copy


def test_model_mode_needs_a_model(student):
    with pytest.raises(ValueError, match="teacher model"):
        Teacher("model", student, None)


# --------------------------------------------------------------------------- frozen_student


def test_frozen_student_is_an_independent_frozen_copy(student):
    initial = snapshot(student)
    t = Teacher("frozen_student", student)
    assert t.model is not student
    assert same_weights(initial, snapshot(t.model))
    assert not any(p.requires_grad for p in t.model.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    assert not t.model.training and student.training
    perturb(student, seed=1)
    t.update(student.parameters())
    assert not same_weights(initial, snapshot(student))
    assert same_weights(initial, snapshot(t.model))  # the teacher did not move
    # no storage shared with the student
    sp = {p.data_ptr() for p in student.parameters()}
    assert not sp & {p.data_ptr() for p in t.model.parameters()}
    assert not t.owns_weights and t.state_dict() == {}


def test_frozen_student_survives_an_optimizer_step(student):
    t = Teacher("frozen_student", student)
    initial = snapshot(t.model)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    ids = torch.randint(0, 100, (2, 6))
    student(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert same_weights(initial, snapshot(t.model))


# --------------------------------------------------------------------------- ema


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 1.0])
def test_ema_update_matches_brute_force(student, decay):
    t = Teacher("ema", student, ema_decay=decay)
    assert t.owns_weights
    assert t.model is not student and not any(p.requires_grad for p in t.model.parameters())
    teacher_before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for step in range(3):
        perturb(student, seed=10 + step)
        s = {n: p.detach().clone() for n, p in student.named_parameters()}
        assert s.keys() == teacher_before.keys()
        t.update(student.parameters())
        got = dict(t.model.named_parameters())
        for name, tv in teacher_before.items():
            sv = s[name]
            if decay in (0.0, 1.0):
                # the limits are exact: d=1 keeps the teacher, d=0 copies the student
                expected = decay * tv + (1 - decay) * sv
                assert torch.equal(got[name], expected), (name, step)
            else:
                exp64 = decay * tv.double() + (1 - decay) * sv.double()
                # float32 rounding only: a few ulp of the operands' magnitude
                tol = 4 * EPS32 * (tv.double().abs() + sv.double().abs()) + 1e-30
                err = (got[name].double() - exp64).abs()
                assert bool((err <= tol).all()), (name, step, float(err.max()))
        teacher_before = {n: p.detach().clone() for n, p in t.model.named_parameters()}


def test_ema_touches_every_parameter(student):
    t = Teacher("ema", student, ema_decay=0.5)
    perturb(student, seed=3)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.update(student.parameters())
    for n, p in t.model.named_parameters():
        assert not torch.equal(before[n], p), n


def test_ema_state_dict_round_trip(student):
    t = Teacher("ema", student, ema_decay=0.5)
    perturb(student, seed=4)
    t.update(student.parameters())
    state = {k: v.clone() for k, v in t.state_dict().items()}
    other = Teacher("ema", copy.deepcopy(student), ema_decay=0.5)
    assert not same_weights(state, other.state_dict())
    other.load_state_dict(state)
    assert same_weights(state, other.state_dict())


# --------------------------------------------------------------------------- live


def test_live_is_the_student_itself(student):
    t = Teacher("live", student)
    assert t.model is student
    assert not t.owns_weights and t.state_dict() == {}
    perturb(student, seed=5)
    assert t.model is student
    t.update(student.parameters())  # no-op


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", ["foo", "EMA", "", "student"])
def test_invalid_mode(student, mode):
    with pytest.raises(ValueError) as info:
        Teacher(mode, student)
    msg = str(info.value)
    for allowed in ("model", "frozen_student", "ema", "live"):
        assert allowed in msg
    assert f"'{mode}'" in msg
