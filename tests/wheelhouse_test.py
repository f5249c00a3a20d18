"""launch/wheelhouse.sh: arguments, the pip commands it would run, and a real offline build.

No network: pip runs with PIP_NO_INDEX=1 and no config files, and the end-to-end test builds
its wheelhouse from two tiny packages made here (one the other's dependency), served from a
local folder as the "index". The download of flaxbert's real dependency set needs an index,
so it is not run here (see "Offline install" in README.md for the measured run).
"""

import configparser
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "wheelhouse.sh"


def offline_env(**more):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_NO_INDEX="1",
        PIP_CONFIG_FILE=os.devnull,
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHON=sys.executable,
        **more,
    )
    return env


def run(*args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env or offline_env(),
        timeout=120,
    )


def command_with(stdout, word):
    """The one printed command line that has `word` as an argument, split as a shell would."""
    lines = [shlex.split(line) for line in stdout.splitlines() if line.strip()]
    found = [line for line in lines if word in line]
    assert len(found) == 1, stdout
    return found[0]


def setup_cfg_requirements(extra=None):
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    section, key = ("options.extras_require", extra) if extra else ("options", "install_requires")
    return [line.strip() for line in cfg.get(section, key).splitlines() if line.strip()]


def test_help():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--python", "--platform", "--extras", "--only", "--dry-run", "manylinux"):
        assert flag in result.stdout


def test_missing_dir():
    result = run()
    assert result.returncode == 2
    assert "missing DIR" in result.stderr
    assert "usage:" in result.stderr


def test_unknown_flag():
    result = run("wheels", "--platfrom", "manylinux2014_x86_64")
    assert result.returncode == 2
    assert "unknown flag '--platfrom'" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["w", "--python", "312"], "is not X.Y"),
        (["w", "--extras", "gpu"], "'gpu' is not an extra"),
        (["w", "--only", "a", "--extras", "test"], "do not mix"),
        (["w", "--python"], "--python needs a value"),
        (["w", "v"], "one DIR only"),
    ],
)
def test_bad_arguments(args, message):
    result = run("--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_dry_run_cross_target(tmp_path):
    wheels = str(tmp_path / "wh")
    result = run(wheels, "--dry-run", "--python", "3.12", "--platform", "manylinux2014_x86_64")
    assert result.returncode == 0, result.stderr
    download = command_with(result.stdout, "download")
    assert "--only-binary=:all:" in download
    assert download[download.index("--python-version") + 1] == "3.12"
    assert download[download.index("--platform") + 1] == "manylinux2014_x86_64"
    assert download[download.index("--implementation") + 1] == "cp"
    assert download[download.index("--dest") + 1] == wheels
    requirements = setup_cfg_requirements()
    assert len(requirements) > 5
    assert download[-len(requirements) :] == requirements
    # flaxbert's own wheel, and the source-only dependency of tensorflow-datasets.
    assert command_with(result.stdout, str(REPO))[-3:] == ["--wheel-dir", wheels, str(REPO)]
    assert command_with(result.stdout, "promise")[1:5] == ["-m", "pip", "wheel", "--no-deps"]
    assert not os.path.exists(wheels)  # printed, not run


def test_dry_run_extras_with_and_newer_glibc():
    result = run(
        "w", "--dry-run", "--extras", "test", "--with", "jax[cuda12]",
        "--platform", "manylinux_2_28_x86_64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    download = command_with(result.stdout, "download")
    for requirement in setup_cfg_requirements() + setup_cfg_requirements("test"):
        assert requirement in download
    assert download[-1] == "jax[cuda12]"
    platforms = [download[i + 1] for i, arg in enumerate(download) if arg == "--platform"]
    # A glibc 2.28 machine also runs wheels built for older glibc.
    assert platforms[0] == "manylinux_2_28_x86_64"
    assert "manylinux_2_27_x86_64" in platforms and "manylinux_2_17_x86_64" in platforms
    assert platforms[-1] == "manylinux2014_x86_64"


def test_dry_run_only():
    result = run("w", "--dry-run", "--only", "tensorflow-datasets ml_collections")
    assert result.returncode == 0, result.stderr
    download = command_with(result.stdout, "download")
    assert download[-2:] == ["tensorflow-datasets", "ml_collections"]
    assert not any(arg.startswith(("jax", "flax")) for arg in download)


def make_package(root, name, requires=()):
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"NAME = {name!r}\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    install_requires = "".join(f"\n    {r}" for r in requires)
    (root / "setup.cfg").write_text(
        f"[metadata]\nname = {name}\nversion = 0.1.0\n\n"
        f"[options]\npackages = {name}\ninstall_requires ={install_requires}\n"
    )
    return root


def test_offline_end_to_end(tmp_path):
    """tinydep's wheel sits in a local folder (the "index"); the wheelhouse of tinyapp, which
    needs tinydep, is built for another Python and platform, then installed with --no-index."""
    index, wheels, target = tmp_path / "index", tmp_path / "wheels", tmp_path / "target"
    dep = make_package(tmp_path / "src_dep", "tinydep")
    app = make_package(tmp_path / "src_app", "tinyapp", requires=["tinydep>=0.1"])

    built = run(str(index), "--project", str(dep), "--no-deps", "--no-build-isolation")
    assert built.returncode == 0, built.stderr
    assert [p.name for p in index.iterdir()] == ["tinydep-0.1.0-py3-none-any.whl"]

    result = run(
        str(wheels), "--project", str(app), "--build", "", "--no-build-isolation",
        "--python", "3.12", "--platform", "manylinux_2_28_x86_64",
        env=offline_env(PIP_FIND_LINKS=str(index)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in wheels.iterdir()) == [
        "tinyapp-0.1.0-py3-none-any.whl",
        "tinydep-0.1.0-py3-none-any.whl",
    ]
    assert f"pip install --no-index --find-links {wheels} tinyapp" in result.stdout

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
         "--target", str(target), "tinyapp"],
        capture_output=True, text=True, env=offline_env(), timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import tinyapp, tinydep; print(tinyapp.NAME, tinydep.NAME)"],
        capture_output=True, text=True, env=offline_env(PYTHONPATH=str(target)), cwd=tmp_path,
    )  # fmt: skip
    assert imported.stdout.split() == ["tinyapp", "tinydep"], imported.stderr


def test_pip_failure_says_what_to_do(tmp_path):
    """No wheel to be had (offline, nothing in find-links): exit 1, naming the package and
    the --platform / --build way out."""
    app = make_package(tmp_path / "src_app", "tinyapp", requires=["tinydep>=0.1"])
    result = run(str(tmp_path / "w"), "--project", str(app), "--build", "", "--python", "3.12")
    assert result.returncode == 1
    assert "no wheel of 'tinydep>=0.1' for Python 3.12" in result.stderr
    assert "--platform" in result.stderr and "--build 'tinydep'" in result.stderr
