"""Long runs that survive interruption: checkpoint, resume, SIGTERM, and evaluating a saved file.

A checkpoint holds the learner: networks, target networks, optimizers, random generators and the
replay buffer (here made to wrap around). A resumed run restores all of it exactly and starts a new
episode (no env state is saved), so the test of exactness is that a checkpoint read and written
back, with no step between, is the same tensor for tensor.
"""

import glob
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_one_line_error, read_scalars, run_script, stops_with

CONTINUOUS = ["xql_sac.py", "xql_td3.py", "iq_continuous.py", "miq_continuous.py"]
# a 200-transition buffer wraps around by step 300
SMALL = "--env-id Hopper-v5 --learning-starts 100 --buffer-size 200 --batch-size 64 --eval-frequency 200 --eval-episodes 1 --seed 5"


def tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    out = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, (dict, list)):
            out.update(tensors(value, f"{prefix}{key}."))
    return out


def checkpoint_path(folder):
    (path,) = glob.glob(os.path.join(str(folder), "runs", "*", "checkpoint.pt"))
    return path


def assert_same_state(a: dict, b: dict, skip=()):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) >= 10
    different = [k for k in ta if k not in skip and not torch.equal(ta[k], tb[k])]
    assert not different, f"state differs: {different}"


@pytest.mark.parametrize("script", CONTINUOUS)
def test_resume_restores_the_learner_exactly_and_continues_the_run(script, tmp_path):
    """Stop at step 300, resume and stop again at once: the checkpoint written back must be the one
    read (a piece of state not restored would show here). Then run to the end: one TensorBoard run."""
    flags = [*SMALL.split(), "--no-cuda", "--total-timesteps", 400]
    proc = run_script(script, [*flags, "--stop-at", 300], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by --stop-at at step 300" in proc.stdout
    first = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert first["script"] == script and first["rb"]["size"] == 200  # the buffer wrapped around
    proc = run_script(script, ["--resume", checkpoint_path(tmp_path), "--stop-at", 300], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert_same_state(first, second)
    assert first["rng"]["python"] == second["rng"]["python"] and first["global_step"] == second["global_step"]
    proc = run_script(script, ["--resume", checkpoint_path(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "at step 300 of 400" in proc.stdout
    evals = read_scalars(tmp_path)["eval/episodic_return"]
    assert [s for s, _ in evals] == [199, 399]


@pytest.mark.parametrize("script", CONTINUOUS)
def test_sigterm_writes_a_checkpoint_that_resumes(script, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, script), *SMALL.split(), "--no-cuda", "--total-timesteps", "100000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()  # printed just before the loop: waits out a slow start on a busy machine
    assert banner.startswith(script), banner
    time.sleep(2.0)  # into training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in out
    checkpoint = torch.load(checkpoint_path(tmp_path), weights_only=False)
    stopped_at = checkpoint["global_step"]
    assert 0 < stopped_at < 100_000
    resumed = run_script(
        script, ["--resume", checkpoint_path(tmp_path), "--total-timesteps", stopped_at + 150], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at} of {stopped_at + 150}" in resumed.stdout


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished 150-step run of each continuous script, checkpointed at its end."""
    paths = {}
    for script in CONTINUOUS:
        folder = tmp_path_factory.mktemp(script[:-3])
        flags = [*SMALL.split(), "--no-cuda", "--total-timesteps", 150, "--checkpoint-frequency", 150]
        proc = run_script(script, flags, folder)
        assert proc.returncode == 0, proc.stderr[-2000:]
        paths[script] = checkpoint_path(folder)
    return paths


@pytest.mark.parametrize("script", CONTINUOUS)
def test_resume_and_eval_model_refuse_what_they_cannot_use(script, finished_runs, tmp_path, monkeypatch):
    module = importlib.import_module(script[:-3])
    path = finished_runs[script]
    other = finished_runs[CONTINUOUS[CONTINUOUS.index(script) - 1]]
    not_a_checkpoint = tmp_path / "data.hdf5"
    not_a_checkpoint.write_bytes(b"\x89HDF\r\n")
    cases = [
        (["--resume", path, "--gamma", 0.9], ["--gamma", "cannot change on --resume"]),
        (["--resume", "nowhere.pt"], ["--resume nowhere.pt", "no such file"]),
        (["--resume", path], ["is complete (150 steps)", "--total-timesteps"]),
        (["--resume", other], ["was written by " + CONTINUOUS[CONTINUOUS.index(script) - 1]]),
        (["--resume", not_a_checkpoint], ["is not a checkpoint or saved model of " + script]),
        (["--eval-model", not_a_checkpoint], ["--eval-model", "is not a checkpoint"]),
        (["--eval-model", other], ["--eval-model", "was written by"]),
    ]
    for argv, names in cases:
        message = stops_with(module, argv, tmp_path, monkeypatch)
        assert all(name in message for name in names), (argv, message)
    # the checkpoint holds the env id and the sizes: evaluating needs its path only
    assert len(module.evaluate(path, eval_episodes=2)) == 2
    proc = run_script(script, ["--eval-model", path, "--eval-episodes", 2], tmp_path)
    assert proc.returncode == 0 and "eval return" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("script", CONTINUOUS)
def test_capture_video_prerequisites_are_checked_before_training(script, tmp_path):
    try:
        import moviepy  # noqa: F401
        import pygame  # noqa: F401

        pytest.skip("moviepy and pygame are installed: nothing is missing")
    except ImportError as exc:
        missing = exc.name
    proc = run_script(script, ["--env-id", "Pendulum-v1", "--capture-video"], tmp_path, timeout=120)
    assert_one_line_error(proc, "--capture-video", missing)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Atari. ale-py's vector env cannot save its emulators, so a resumed run starts new games: the
# learner's state (networks, optimizer, random generators, counters, the replay buffer on request)
# is restored exactly, and the schedules continue; the weights after further training differ from
# a run done in one go because the games do.
# ---------------------------------------------------------------------------------------------
ATARI = {
    "soft_dqn_atari.py": "--buffer-size 1000 --learning-starts 200 --batch-size 32 --target-network-frequency 100 "
    "--checkpoint-buffer",
    "soft_a2c_atari.py": "--num-envs 4",
}
ATARI_COMMON = "--eval-frequency 300 --eval-episodes 1 --max-episode-frames 2000 --seed 3 --no-cuda"


def atari_flags(script, total):
    return [*ATARI[script].split(), *ATARI_COMMON.split(), "--total-timesteps", total]


@pytest.mark.parametrize("script", ATARI)
def test_atari_checkpoint_restores_the_learner_exactly(script, tmp_path):
    """Stop at 300 steps, resume and stop again at once: the checkpoint written back must be the one
    read, tensor for tensor (a piece of state that is not restored would show here)."""
    proc = run_script(script, [*atari_flags(script, 600), "--stop-at", 300], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by --stop-at at step 300" in proc.stdout
    first = torch.load(checkpoint_path(tmp_path), weights_only=False)
    proc = run_script(script, ["--resume", checkpoint_path(tmp_path), "--stop-at", 300], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = torch.load(checkpoint_path(tmp_path), weights_only=False)
    # a resumed DQN run marks the stored episode as cut (its game does not go on), one flag at the
    # end, and stores the first 4 frames of its new game after the stored frames
    skip = {"rb.ends", "rb.frames"} if "rb" in first else set()
    assert_same_state(first, second, skip)
    if skip:
        rb1, rb2 = first["rb"], second["rb"]
        changed = (rb1["ends"] != rb2["ends"]).nonzero().flatten().tolist()
        assert changed == [(rb1["count"] - 1) % len(rb1["ends"])]
        new = [(rb1["frame_count"] + i) % len(rb1["frames"]) for i in range(4)]
        assert rb2["frame_count"] == rb1["frame_count"] + 4
        kept = [i for i in range(len(rb1["frames"])) if i not in new]
        assert torch.equal(rb1["frames"][kept], rb2["frames"][kept])
    assert first["rng"]["python"] == second["rng"]["python"]
    assert first["global_step"] == second["global_step"] == 300


@pytest.mark.parametrize("script", ATARI)
def test_atari_resume_continues_counters_schedules_and_logs(script, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir(), halves.mkdir()
    proc = run_script(script, [*atari_flags(script, 600), "--checkpoint-frequency", 600], straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script(script, [*atari_flags(script, 600), "--stop-at", 300], halves)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script(script, ["--resume", checkpoint_path(halves), "--checkpoint-frequency", 600], halves)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "new games" in proc.stdout
    a = torch.load(checkpoint_path(straight), weights_only=False)
    b = torch.load(checkpoint_path(halves), weights_only=False)
    assert a["global_step"] == b["global_step"] == 600
    # the optimizer took as many steps, at the same learning rate
    steps = lambda c: [float(s["step"]) for s in c["optimizer"]["state"].values()]  # noqa: E731
    assert steps(a) == steps(b) and steps(a)[0] > 0
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # one TensorBoard run: the evaluation before the stop is kept, the ones after it are added
    evals = lambda folder: [s for s, _ in read_scalars(folder)["eval/episodic_return"]]  # noqa: E731
    assert evals(halves) == evals(straight) and len(evals(straight)) == 2
    if script == "soft_a2c_atari.py":
        # A2C draws the same number of random actions whatever the games: its torch generator agrees
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("script", ATARI)
def test_atari_capture_video_needs_moviepy_before_training(script, tmp_path):
    try:
        import moviepy  # noqa: F401

        pytest.skip("moviepy is installed: nothing is missing")
    except ImportError:
        pass
    proc = run_script(script, ["--capture-video"], tmp_path, timeout=120)
    assert_one_line_error(proc, "--capture-video", "moviepy")
    assert not (tmp_path / "runs").exists()
    proc = run_script(script, ["--eval-model", "nowhere.pt", "--capture-video"], tmp_path, timeout=120)
    assert_one_line_error(proc, "--eval-model nowhere.pt", "no such file")
