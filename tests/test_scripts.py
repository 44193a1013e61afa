"""launch/install.sh, launch/quickstart.sh and tests/run.sh, with a stand-in for the Python they are given
(PYTHON=...): its pip only records what it was asked, so no test installs anything; everything
else is the real interpreter, except what a test replaces (a hidden or a broken torch, a training
run that only writes a run folder).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = f"""#!/bin/bash
case "$1 $2" in
  "-m pip")
    echo "${{*:3}}" >>"$FAKE_DIR/pip"
    # "installing" torch ends the hiding that sitecustomize.py below does
    [[ " $* " == *" $TORCH_SPEC "* ]] && touch "$FAKE_DIR/torch-installed"
    exit 0 ;;
  "-m shards") exit 0 ;;
  "-m ruff") exit 0 ;;
  "-m pytest")  # tests/run.sh's suite: only its arguments, and when it came (after which pip call)
    echo "${{*:3}}" >>"$FAKE_DIR/pytest"
    echo "pytest" >>"$FAKE_DIR/pip"
    exit 0 ;;
  "-m accelerate.commands.launch")  # a finished 3-step run in run.dir=..., as launch/train.py leaves it
    for a; do [[ $a == run.dir=* ]] && run=${{a#run.dir=}}; done
    mkdir -p "$run/checkpoints/step_3" "$run/samples"
    echo checkpoints/step_3 >"$run/latest"
    touch "$run/samples/step_3.png"
    exit 0 ;;
esac
exec {shlex.quote(sys.executable)} "$@"
"""
HIDE_TORCH = """import os, sys
if os.environ.get("FAKE_TORCH") == "missing" and not os.path.exists(os.environ["FAKE_DIR"] + "/torch-installed"):
    sys.modules["torch"] = None  # find_spec("torch") is None and `import torch` fails, as without torch
"""


@pytest.fixture
def fake(tmp_path):
    """The environment for the scripts: PYTHON is the stand-in; pip_calls() lists what pip was asked (and "pytest" where
    tests/run.sh started the suite: the order of the two)."""
    d = tmp_path / "fake"
    (d / "site").mkdir(parents=True)
    (d / "python").write_text(FAKE_PYTHON)
    (d / "python").chmod(0o755)
    (d / "site" / "sitecustomize.py").write_text(HIDE_TORCH)
    env = dict(os.environ, PYTHON=str(d / "python"), FAKE_DIR=str(d), TORCH_SPEC="torch==9.9.9",
               PYTHONPATH=os.pathsep.join(filter(None, [str(d / "site"), os.environ.get("PYTHONPATH")])))
    env.pop("FAKE_TORCH", None)

    class Fake:
        dir = d

        @staticmethod
        def pip_calls():
            f = d / "pip"
            return f.read_text().splitlines() if f.exists() else []

    Fake.env = env
    return Fake


def run(script, *argv, env, cwd=ROOT, timeout=120):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- tests/run.sh


def run_tests_sh(*argv, env):
    return subprocess.run(["bash", str(ROOT / "tests" / "run.sh"), *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("workers, xdist", [(None, ["-n", "2", "--dist", "loadfile"]), ("0", []), ("00", []),
                                            ("4", ["-n", "4", "--dist", "loadfile"]),
                                            ("08", ["-n", "8", "--dist", "loadfile"])])
def test_run_sh_installs_then_runs_the_suite_in_the_processes_asked(fake, workers, xdist):
    env = dict(fake.env)
    env.pop("TEST_WORKERS", None)
    if workers is not None:
        env["TEST_WORKERS"] = workers
    r = run_tests_sh("-k", "checkpoint", env=env)
    assert r.returncode == 0, r.stderr
    calls = fake.pip_calls()
    assert calls[-1] == "pytest" and any(".[deepspeed,test]" in c for c in calls[:-1]), calls  # install first
    (args,) = (fake.dir / "pytest").read_text().splitlines()
    args = args.split()
    assert args[-2:] == ["-k", "checkpoint"]  # the caller's arguments last: they win over the defaults
    assert args[:-2] == ["-q", "-ra", "--durations=15", *xdist]


@pytest.mark.parametrize("workers", ["x", "-1", "1.5", "2 ", "1000", "99999999999999999999"])
def test_run_sh_refuses_a_bad_worker_count_before_installing_anything(fake, workers):
    r = run_tests_sh(env=dict(fake.env, TEST_WORKERS=workers))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: TEST_WORKERS={workers} is not a whole number from 0 to 999 (0: one pytest process)\n"
    assert fake.pip_calls() == [] and not (fake.dir / "pytest").exists()


# ----------------------------------------------------------------------------------------------- install.sh


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_install_help_installs_nothing(fake, flag):
    r = run("install.sh", flag, env=fake.env)  # used to run the whole install
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "usage: bash launch/install.sh [--test]", r.stdout
    assert fake.pip_calls() == [] and r.stderr == ""


@pytest.mark.parametrize("argv", [["--bogus"], ["--test", "--tests"], ["test"]])
def test_install_refuses_an_unknown_argument(fake, argv):
    r = run("install.sh", *argv, env=fake.env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: install.sh: unknown argument '{argv[-1]}' (usage: bash launch/install.sh [--test])"]
    assert fake.pip_calls() == [] and r.stdout == ""


def test_install_with_torch_there_installs_only_the_harness(fake):
    r = run("install.sh", "--test", env=fake.env)
    assert r.returncode == 0, r.stderr
    assert fake.pip_calls() == ["install -q -e .[deepspeed,test]"]


def test_install_without_torch_installs_torch_spec(fake):
    r = run("install.sh", env=dict(fake.env, FAKE_TORCH="missing"))
    assert r.returncode == 0, r.stderr
    assert "[install] torch missing: installing torch==9.9.9" in r.stdout
    assert fake.pip_calls() == ["install -q torch==9.9.9", "install -q -e .[deepspeed]"]


def test_install_never_installs_over_a_torch_that_fails_to_import(fake, tmp_path):
    """A CUDA build whose libraries are not loaded: reinstalling over it replaced the user's build
    and hid the real error."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise OSError("libcudart.so.12: cannot open shared object file")\n')
    env = dict(fake.env, PYTHONPATH=f"{broken.parent}{os.pathsep}{fake.env['PYTHONPATH']}")
    r = run("install.sh", env=env)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: install.sh: torch is installed but 'import torch' fails (OSError: libcudart.so.12: cannot open "
        "shared object file): fix that environment (a CUDA module not loaded?) or uninstall torch to let "
        "install.sh install torch==9.9.9"]
    assert fake.pip_calls() == []


# -------------------------------------------------------------------------------------------- quickstart.sh


def test_quickstart_prints_paths_that_work_from_where_it_was_run(fake, tmp_path):
    """Run from another folder, it printed runs/demo and `tensorboard --logdir runs/demo/tb`, which
    point nowhere from there. RUN_DIR is read relative to the repository; a space must survive."""
    run_dir = tmp_path / "my runs" / "demo"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(fake.env, RUN_DIR=os.path.relpath(run_dir, ROOT))
    r = run("quickstart.sh", env=env, cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert f"Run folder: {run_dir}" in lines, r.stdout
    assert f"  checkpoints: {run_dir}/checkpoints/ (step_3)" in lines, r.stdout
    assert f"  text log:    {run_dir}/train.log" in lines, r.stdout
    watch = next(line for line in lines if line.startswith("Watch it:"))
    assert shlex.split(watch.removeprefix("Watch it:")) == ["tensorboard", "--logdir", f"{run_dir}/tb"], watch
