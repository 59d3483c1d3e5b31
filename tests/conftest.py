"""Shared test helpers: run a script as a user would, and read what it wrote to TensorBoard."""

import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two test workers share the machine's 2 cores: one thread each, and one for every script they run
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_script(script: str, args: list, cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python ROOT/script args...` in `cwd` (where it writes runs/), capturing its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def read_scalars(run_root) -> dict:
    """{tag: [(step, value), ...]} from the single run under `run_root`/runs/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = glob.glob(os.path.join(str(run_root), "runs", "*"))
    assert len(runs) == 1, f"expected one run folder, found {runs}"
    acc = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_one_line_error(proc: subprocess.CompletedProcess, *must_contain: str) -> str:
    """The process failed before training with a single 'error: ...' line naming the fix."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0, f"expected failure, got rc=0; stdout={proc.stdout[-500:]}"
    assert len(lines) == 1, f"expected a one-line error, got:\n{proc.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def stops_with(module, argv, cwd, monkeypatch) -> str:
    """The one-line error a script stops with for the command line `argv`, found in-process: chdir to
    `cwd` and call train(tyro.cli(Args)) as the script's __main__ does. Checks that it is one line
    starting 'error:' and that no run folder was made."""
    import tyro

    argv = [str(a) for a in argv]
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module.SCRIPT, *argv])
    with pytest.raises(SystemExit) as exc:
        module.train(tyro.cli(module.Args, args=argv))
    message = str(exc.value.code)
    assert message.startswith("error:") and "\n" not in message, message
    assert not os.path.exists(os.path.join(str(cwd), "runs")), "no run may start on bad input"
    return message


def pytest_collection_modifyitems(items):
    """The slow learning tests first: the two workers then run them side by side and the short tests
    fill in after, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("learning") is None)
