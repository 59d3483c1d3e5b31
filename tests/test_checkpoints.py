"""Long runs that survive interruption: checkpoint, resume, SIGTERM, and evaluating a saved file.

The property that matters is exactness: a run stopped half-way and resumed from its checkpoint must
end with the same weights, bit for bit, as the same run done in one go. That needs every piece of
state: networks, target networks, optimizers, random generators, the replay buffer (here made to
wrap around) and the env in the middle of an episode (MuJoCo physics included).
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_one_line_error, read_scalars, run_script

CONTINUOUS = ["xql_sac.py", "xql_td3.py", "iq_continuous.py", "miq_continuous.py"]
# Hopper-v5: MuJoCo state must be restored mid-episode; a 200-transition buffer wraps around
SMALL = "--env-id Hopper-v5 --learning-starts 100 --buffer-size 200 --eval-frequency 200 --eval-episodes 1 --seed 5"


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


def saved_model(folder):
    (path,) = glob.glob(os.path.join(str(folder), "runs", "*", "*.cleanrl_model"))
    return torch.load(path, weights_only=False)


def checkpoint_path(folder):
    (path,) = glob.glob(os.path.join(str(folder), "runs", "*", "checkpoint.pt"))
    return path


@pytest.mark.parametrize("script", CONTINUOUS)
def test_half_resume_half_equals_one_go(script, tmp_path):
    flags = [*SMALL.split(), "--save-model", "--no-cuda"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir(), halves.mkdir()
    proc = run_script(script, [*flags, "--total-timesteps", 400], straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script(script, [*flags, "--total-timesteps", 200, "--checkpoint-frequency", 200], halves)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script(script, ["--resume", checkpoint_path(halves), "--total-timesteps", 400], halves)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" in proc.stdout and "at step 200 of 400" in proc.stdout
    a, b = tensors(saved_model(straight)), tensors(saved_model(halves))
    assert a.keys() == b.keys() and len(a) >= 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"
    # the resumed run logs into the same TensorBoard run, continuing its steps
    evals = read_scalars(halves)["eval/episodic_return"]
    assert [s for s, _ in evals] == [199, 399]


@pytest.mark.parametrize("script", CONTINUOUS)
def test_sigterm_writes_a_checkpoint_that_resumes(script, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, script), *SMALL.split(), "--no-cuda", "--total-timesteps", "100000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / "*" / "events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # into training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "continue with --resume" in out
    checkpoint = torch.load(checkpoint_path(tmp_path), weights_only=False)
    stopped_at = checkpoint["global_step"]
    assert 0 < stopped_at < 100_000
    resumed = run_script(
        script, ["--resume", checkpoint_path(tmp_path), "--total-timesteps", stopped_at + 150], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at} of {stopped_at + 150}" in resumed.stdout


@pytest.mark.parametrize("script", CONTINUOUS)
def test_resume_refuses_a_changed_flag_and_eval_model_needs_only_the_path(script, tmp_path):
    proc = run_script(
        script, [*SMALL.split(), "--no-cuda", "--total-timesteps", 150, "--checkpoint-frequency", 150], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = checkpoint_path(tmp_path)
    proc = run_script(script, ["--resume", path, "--gamma", 0.9], tmp_path)
    assert_one_line_error(proc, "--gamma", "cannot change on --resume")
    proc = run_script(script, ["--resume", "nowhere.pt"], tmp_path)
    assert_one_line_error(proc, "--resume nowhere.pt", "no such file")
    # the checkpoint holds the env id and the sizes: evaluating needs its path only
    proc = run_script(script, ["--eval-model", path, "--eval-episodes", 2], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval return" in proc.stdout and "over 2 episodes" in proc.stdout
    # on an env whose spaces differ, a one-line error instead of a state_dict size mismatch
    module = __import__(script[:-3])
    with pytest.raises(SystemExit, match="was trained on Hopper-v5"):
        module.evaluate(path, "Pendulum-v1", eval_episodes=1)


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


def assert_same_state(a: dict, b: dict, skip=()):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) >= 10
    different = [k for k in ta if k not in skip and not torch.equal(ta[k], tb[k])]
    assert not different, f"state differs: {different}"


@pytest.mark.parametrize("script", ATARI)
def test_atari_checkpoint_restores_the_learner_exactly(script, tmp_path):
    """Stop at 300 steps, resume with nothing left to do: the checkpoint written at the end must be
    the one read, tensor for tensor (a piece of state that is not restored would show here)."""
    proc = run_script(script, [*atari_flags(script, 600), "--stop-at", 300], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by --stop-at at step 300" in proc.stdout
    first = torch.load(checkpoint_path(tmp_path), weights_only=False)
    proc = run_script(
        script,
        ["--resume", checkpoint_path(tmp_path), "--total-timesteps", 300, "--checkpoint-frequency", 300],
        tmp_path,
    )
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
