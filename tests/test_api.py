"""The documented Python API: docs/api.md runs as written, and `import mmdistill` stays light."""
import re
import subprocess
import sys

import pytest

import mmdistill
from mmdistill import api
from mmdistill.config import REPO_ROOT
from tests.helpers import command_env

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "docs" / "api.md").read_text(), re.S)


def test_the_package_exports_the_api_and_nothing_else():
    assert mmdistill.__all__ == api.__all__
    assert all(getattr(mmdistill, name) is getattr(api, name) for name in api.__all__)
    with pytest.raises(AttributeError):
        mmdistill.not_a_name  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, mmdistill; assert 'torch' not in sys.modules; mmdistill.Views; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=command_env(), check=True)


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_every_block_of_the_api_page_runs(tmp_path, block):
    proc = subprocess.run([sys.executable, "-c", BLOCKS[block]], cwd=tmp_path, env=command_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if block == 0:
        assert '"steps": 3' in proc.stdout and (tmp_path / "runs" / "api-demo" / "student").is_dir()
    else:
        assert "share_ht" in proc.stdout and "('student', 'student_priv', 'teacher_full')" in proc.stdout


def test_a_loaded_config_takes_no_overrides():
    with pytest.raises(mmdistill.ConfigError, match="overrides go with a config name or path"):
        mmdistill.train(mmdistill.load_config("tiny"), ["train.max_steps=1"])
