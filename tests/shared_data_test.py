"""Missing shared data: a skip on a user's machine, a failure under CI."""

import os
import subprocess
import sys

import pytest
import shared_data


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_data_fails_under_ci(tmp_path, value):
    with pytest.raises(pytest.fail.Exception, match="none.txt is absent.*under CI the shared"):
        shared_data.require(tmp_path, tmp_path / "none.txt", environ={"CI": value})


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}])
def test_missing_data_skips_elsewhere(tmp_path, env):
    with pytest.raises(pytest.skip.Exception, match="none.txt is absent"):
        shared_data.require(tmp_path, tmp_path / "none.txt", environ=env)
    shared_data.require(tmp_path, environ={"CI": "true"})  # present: nothing happens


def test_ci_refuses_to_import_without_the_data(tmp_path):
    """Every test file that reads the data imports this module: under CI it fails to import
    when the data is absent, so no such file can skip its way through."""

    def run(**env):
        return subprocess.run(
            [sys.executable, "-c", "import shared_data"],
            cwd=os.path.dirname(shared_data.__file__),
            env={**os.environ, "FLAXBERT_SHARED_DATA": str(tmp_path), **env},
            capture_output=True,
            text=True,
        )

    failed = run(CI="true")
    assert failed.returncode == 1
    assert f"{tmp_path}/corpus/ko_nsmc_reviews.txt" in failed.stderr
    assert run(CI="false").returncode == 0
