"""`mmdistill` command line: help, --print-config, config errors reported before any model loads."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mmdistill.config import DEFAULT_CONFIG, load_config
from tests.helpers import REPO, command_env, run_mmdistill


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_mmdistill(*args, timeout=timeout, COLUMNS="100")


def test_help_lists_every_command_one_line_each():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "COMMAND")
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line)
    # one entry per command, no wrapped continuation lines
    assert [line.split()[0] for line in block] == ["train", "eval", "selfcheck", "plot", "report", "data"], block
    for line in block:
        assert len(line.split()) > 1, f"no help text: {line!r}"


def test_print_config_prints_yaml_and_does_not_train(tmp_path):
    out = tmp_path / "x"
    r = run_cli("train", "--print-config", "tiny", "train.max_steps=7", f"train.output_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "max_steps: 7" in r.stdout
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["max_steps"] == 7
    assert printed["train"]["output_dir"] == str(out)
    assert printed["student"]["arch"]["hidden_size"] == 32  # from configs/tiny.yaml
    assert not out.exists(), "--print-config created the run directory"
    # the printed YAML is a complete, valid config that loads back to the same thing
    f = tmp_path / "printed.yaml"
    f.write_text(r.stdout)
    assert yaml.safe_load(r.stdout) == _plain(load_config(f))


def test_unknown_key_fails_fast_with_one_line(tmp_path):
    out = tmp_path / "x"
    r = run_cli("train", "tiny", "train.max_stepz=1", f"train.output_dir={out}")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err, f"stderr is not one line: {err!r}"
    assert "train.max_stepz" in err
    assert "max_steps" in err  # the allowed keys are listed
    assert "Traceback" not in err
    assert r.stdout == ""
    assert not out.exists(), "the run directory was created before the config was validated"


def _train_in_a_fresh_interpreter(overrides: list[str], heavy: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`main(['train', 'tiny', *overrides])` in a new Python; stdout is its exit code and which of
    the `heavy` modules it had imported by then."""
    code = (
        "import sys\n"
        "from mmdistill.cli import main\n"
        f"rc = main(['train', 'tiny', *{overrides!r}])\n"
        f"print(rc, sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=command_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r


def test_config_error_is_reported_before_heavy_imports(tmp_path):
    """No model can have loaded: torch / transformers are not even imported."""
    r = _train_in_a_fresh_interpreter(["teacher.mode=foo", f"train.output_dir={tmp_path / 'x'}"],
                                      ("torch", "transformers", "accelerate", "mmdistill.training.loop"))
    assert r.stdout.strip() == "2 []"
    assert r.stderr.strip().count("\n") == 0 and "'teacher.mode'" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("overrides, line", [
    (["student.path=/nope/model"], "config key 'student.path': '/nope/model' does not exist"),
    (["student.path=someorg/somemodel"],
     "config key 'student.path' is 'someorg/somemodel', which is not a local directory: "
     "mmdistill loads local directories and files only and never downloads"),
    (["teacher.model.path=someorg/teacher"],
     "config key 'teacher.model.path' is 'someorg/teacher', which is not a local"),
    (["data.source=jsonl", "data.train_path=/nope/train.jsonl"],
     "config key 'data.train_path': '/nope/train.jsonl' does not exist"),
])
def test_a_missing_path_is_one_line_before_heavy_imports(tmp_path, overrides, line):
    """Nothing is loaded and the Hub is never asked: torch and transformers are not even imported."""
    r = _train_in_a_fresh_interpreter([*overrides, f"train.output_dir={tmp_path / 'x'}"],
                                      ("torch", "transformers", "huggingface_hub"))
    assert r.stdout.strip() == "2 []"
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mmdistill: {line}"), r.stderr
    assert not (tmp_path / "x").exists()


def test_eval_checks_its_split_paths_before_loading(tmp_path):
    r = run_cli("eval", "tiny", "eval.splits={ood: /nope/ood.jsonl}")
    assert r.returncode == 2
    assert r.stderr == "mmdistill: config key 'eval.splits.ood': '/nope/ood.jsonl' does not exist\n"


def test_override_without_equals_exits_2():
    r = run_cli("train", "tiny", "train.max_steps")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.max_steps" in r.stderr


def test_missing_config_exits_2():
    r = run_cli("train", "no_such_config", "--print-config")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "no_such_config" in err and "tiny" in err


def test_only_overrides_uses_default_config():
    if not DEFAULT_CONFIG.is_file():
        pytest.skip("configs/default.yaml does not exist")
    r = run_cli("train", "train.max_steps=7", "--print-config")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["max_steps"] == 7
    expected = _plain(load_config(DEFAULT_CONFIG, ["train.max_steps=7"]))
    expected["train"].pop("output_dir")  # may hold ${now:}
    printed["train"].pop("output_dir")
    assert printed == expected


def test_only_overrides_form_reads_the_default_config(tmp_path, monkeypatch, capsys):
    """In-process, with DEFAULT_CONFIG pointed at a temporary file (works with or without default.yaml)."""
    import mmdistill.cli as cli

    default = tmp_path / "default.yaml"
    default.write_text("train:\n  seed: 11\n  max_steps: 3\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", default)
    assert cli.main(["train", "train.max_steps=7", "train.batch_size=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7  # the first override is not taken for CONFIG
    assert printed["train"]["batch_size"] == 2
    assert printed["train"]["seed"] == 11  # from the default config


def test_print_config_between_overrides():
    r = run_cli("train", "tiny", "--print-config", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["max_steps"] == 7


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
