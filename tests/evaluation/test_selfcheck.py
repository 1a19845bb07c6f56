from mmdistill.config import load_config
from mmdistill.evaluation.selfcheck import main, selfcheck
from mmdistill.methods.registry import METHODS
from mmdistill.models.loading import load_model, load_tokenizer


def test_every_method_is_zero_when_teacher_is_student_and_p_is_empty(capsys):
    cfg = load_config("tiny")
    rows = selfcheck(cfg)
    names = {r[0].split("/")[0] for r in rows}
    assert names == set(METHODS) - {"sft"}  # every distillation method is checked
    assert {"opd/full", "opd/topk", "opd/sampled"} <= {r[0] for r in rows}
    for name, loss, grad in rows:
        assert loss <= 1e-5 and grad <= 1e-5, name
    assert main(cfg) == 0 and "selfcheck passed" in capsys.readouterr().out


def test_the_check_fails_for_a_different_teacher():
    cfg = load_config("tiny")
    other = load_model(cfg.student, load_tokenizer(cfg.student), seed=123)
    rows = selfcheck(cfg, teacher_model=other)
    assert all(loss > 1e-5 or grad > 1e-5 for _, loss, grad in rows)


def test_selfcheck_on_a_composite_vlm_with_image_privileges():
    """Boxes drawn on the privileged image and rendered as text: with no privileged information
    every view equals the student's, so every method is exactly zero."""
    cfg = load_config("tiny_vlm")
    assert cfg.privileged.image.source == "draw" and "{boxes}" in cfg.privileged.text
    for name, loss, grad in selfcheck(cfg):
        assert loss <= 1e-5 and grad <= 1e-5, name
