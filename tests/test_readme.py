"""README's set-up commands are the ones CI runs, and the shipped assets are what README says."""
import re

import pytest

from mmdistill.config import REPO_ROOT, load_config
from mmdistill.models.loading import check_same_vocab, load, load_tokenizer

README = (REPO_ROOT / "README.md").read_text()
CI = (REPO_ROOT / ".ci" / "run").read_text()


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_exactly_two_setup_commands():
    setup = README.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in bash_blocks(setup)]
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert blocks[0].endswith("mmdistill train")


def test_ci_installs_and_tests_exactly_as_readme_says():
    test_cmd = [b.strip() for b in bash_blocks(README)][1]
    steps = [s.strip() for s in test_cmd.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    ci_lines = [line.strip() for line in CI.splitlines() if line.strip() and not line.startswith("#")]
    for step in steps:
        assert step in ci_lines, f"README step {step!r} is not run by .ci/run"
    assert ci_lines[-1] == steps[-1]  # the test command is the last thing CI runs


@pytest.mark.parametrize("config, ratio", [("default", 5), ("arith_opd", 5)])
def test_shipped_assets_load_and_share_the_vocabulary(config, ratio):
    """The default (scenes VLMs) and the text demo's pairs: one vocabulary (assets/tokenizer's,
    plus the image token for the VLMs), and a teacher much larger than its student."""
    cfg = load_config(config)
    student, proc = load(cfg.student)
    teacher, teacher_proc = load(cfg.teacher.model)
    tok, teacher_tok = (getattr(p, "tokenizer", p) for p in (proc, teacher_proc))
    check_same_vocab(tok, teacher_tok, "shipped assets")
    base = load_tokenizer(load_config(None).student).get_vocab()
    extra = {k: v for k, v in tok.get_vocab().items() if base.get(k) != v}
    assert extra == ({"<image>": len(base)} if config == "default" else {})
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert n_t > ratio * n_s
