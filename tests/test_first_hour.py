"""A newcomer's bad inputs end in one line naming the fix, before anything is written to runs/;
and every script shows its progress. The checks are called in-process."""

import dataclasses
import importlib
import io
import sys

import pytest
import torch
import tyro

SCRIPTS = ["iq_continuous", "miq_continuous", "xql_sac", "xql_td3", "soft_dqn_atari", "soft_a2c_atari", "xql_offline"]
CONTINUOUS = ["iq_continuous", "miq_continuous", "xql_sac", "xql_td3"]


def error_of(module, **changes) -> str:
    """The message check_args stops with for Args(**changes), or fail if it does not stop."""
    args = dataclasses.replace(module.Args(), **changes)
    with pytest.raises(SystemExit) as stop:
        module.check_args(args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_values_stop_with_one_line_naming_the_flag(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    for gamma in (1.5, 1.0, 0.0, -0.5):
        assert "--gamma must be in (0, 1)" in error_of(module, gamma=gamma)
    assert "--eval-episodes must be >= 1" in error_of(module, eval_episodes=0)
    assert "--seed must be >= 0" in error_of(module, seed=-1)
    lr = {"policy_lr": 0.0} if name == "xql_sac" else {"learning_rate": -1e-3}
    assert "must be > 0" in error_of(module, **lr)
    if importlib.util.find_spec("wandb") is None:
        assert "--track needs wandb: pip install wandb" in error_of(module, track=True)
    module.check_args(module.Args())  # the defaults pass
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", CONTINUOUS)
def test_a_buffer_smaller_than_a_batch_is_refused(name):
    module = importlib.import_module(name)
    assert "--buffer-size 10 < --batch-size 256" in error_of(module, buffer_size=10, batch_size=256)


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_takes_a_run_folder(name, tmp_path):
    module = importlib.import_module(name)
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    torch.save({"script": module.SCRIPT, "args": {}}, folder / "checkpoint.pt")
    assert module.load_checkpoint(str(folder), "--resume")["script"] == module.SCRIPT
    with pytest.raises(SystemExit, match="no such file"):
        module.load_checkpoint(str(tmp_path / "nothing"), "--resume")


def test_offline_dataset_that_is_not_hdf5_is_one_line(tmp_path):
    import xql_offline

    for content in (b"", b"<html>404</html>"):
        path = tmp_path / "hopper-medium-v2.hdf5"
        path.write_bytes(content)
        with pytest.raises(SystemExit) as stop:
            xql_offline.load_dataset(str(path))
        assert str(stop.value.code).startswith(f"error: {path} is not an HDF5 file")


@pytest.mark.parametrize("name", ["soft_dqn_atari", "soft_a2c_atari"])
def test_non_atari_discrete_envs_are_said_to_be_unsupported(name):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit, match="no script here takes other discrete envs"):
        module.atari_game("CartPole-v1")


@pytest.mark.parametrize("name", ["xql_sac", "xql_td3"])
def test_cleanrl_tau_is_the_polyak_rate(name):
    module = importlib.import_module(name)
    assert tyro.cli(module.Args, args=["--tau", "0.01"]).lam == 0.01
    assert tyro.cli(module.Args, args=["--lam", "0.02"]).lam == 0.02


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_gives_the_values_not_the_names_of_constants(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        tyro.cli(module.Args, args=["--help"])
    text = capsys.readouterr().out
    assert "RESUME_FLAGS" not in text and "BETA_DEFAULTS" not in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_progress_in_a_log_is_one_line_every_30_s(name, monkeypatch):
    module = importlib.import_module(name)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    clock = iter([1000.0, 1010.0, 1031.0, 1032.0, 1062.0])
    monkeypatch.setattr(module.time, "time", lambda: next(clock))
    progress = module.Progress(total=10_000, start=0)  # t = 1000
    progress.update(500, None)  # 10 s: nothing
    progress.update(3100, -12.34)  # 31 s: a line
    progress.update(3150, -12.34)  # 1 s later: nothing
    progress.update(6100, 7.0)  # 31 s after the last line: 97/s then, 99/s smoothed
    lines = out.getvalue().splitlines()
    assert lines == ["3100/10000 steps, 100/s, 0:01:09 left, last return -12.3",
                     "6100/10000 steps, 99/s, 0:00:39 left, last return 7.0"]  # fmt: skip
    progress.print("step 6100: eval return 7.0")
    progress.print()  # the end: nothing more in a log
    assert out.getvalue().splitlines()[2:] == ["step 6100: eval return 7.0"]


@pytest.mark.parametrize("name", ["xql_sac", "soft_dqn_atari"])
def test_progress_on_a_terminal_redraws_one_line(name, monkeypatch):
    module = importlib.import_module(name)
    out = io.StringIO()
    out.isatty = lambda: True
    monkeypatch.setattr(sys, "stdout", out)
    clock = iter([1000.0, 1001.0, 1002.0])
    monkeypatch.setattr(module.time, "time", lambda: next(clock))
    progress = module.Progress(total=100, start=0)
    progress.update(10, None)
    progress.print("step 10: eval return 1.0")
    progress.update(20, 1.0)
    progress.print()
    assert out.getvalue() == ("\r\033[K10/100 steps, 10/s, 0:00:09 left, last return -\r\033[Kstep 10: eval return 1.0\n"
                              "\r\033[K20/100 steps, 10/s, 0:00:08 left, last return 1.0\n")  # fmt: skip
