"""Tests of xql_offline.py (Garg et al. 2023, offline; docs/xql_offline.md) and of the dataset tool."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT as _ROOT
from conftest import read_scalars, run_script, stops_with

import xql_offline as xo
from tools import make_offline_dataset as mk

sys.path.insert(0, str(Path(_ROOT) / "tools"))  # make_d4rl_datasets imports make_offline_dataset
import make_d4rl_datasets as d4  # noqa: E402

ROOT = Path(_ROOT)

# Three trajectories, observations numbered so that a wrong pairing is visible:
#   A: 0 -> 1 -> 2 -> (3), ends in a time-out;  B: 10 -> 11 -> (12), ends in a termination;
#   C: 20 -> 21 -> (22), ends in a time-out at the end of the file.
OBS = np.array([[0], [1], [2], [10], [11], [20], [21]], dtype=np.float32)
NEXT = np.array([[1], [2], [3], [11], [12], [21], [22]], dtype=np.float32)
RAW = {
    "observations": OBS,
    "actions": np.arange(7, dtype=np.float32)[:, None] / 10,
    "rewards": np.array([1, 2, 3, 10, 20, -1, -2], dtype=np.float32),
    "terminals": np.array([0, 0, 0, 0, 1, 0, 0], dtype=bool),
    "timeouts": np.array([0, 0, 1, 0, 0, 0, 1], dtype=bool),
}


def write_raw(path, raw, **attrs):
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs)


def test_hdf5_with_next_observations_keeps_timeouts_and_bootstraps_them(tmp_path):
    write_raw(tmp_path / "d.hdf5", {**RAW, "next_observations": NEXT})
    raw, _ = xo.read_d4rl_hdf5(str(tmp_path / "d.hdf5"))
    data = xo.qlearning_dataset(raw)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 10, 11, 20, 21])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 11, 12, 21, 22])  # 2 -> 3, not 10
    np.testing.assert_array_equal(data["dones"], [0, 0, 0, 0, 1, 0, 0])  # the time-out is not a termination
    np.testing.assert_allclose(data["actions"][:, 0], np.arange(7) / 10)
    np.testing.assert_array_equal(data["rewards"], RAW["rewards"])


def test_hdf5_without_next_observations_never_pairs_two_trajectories(tmp_path):
    write_raw(tmp_path / "d.hdf5", RAW)
    data = xo.qlearning_dataset(xo.read_d4rl_hdf5(str(tmp_path / "d.hdf5"))[0])
    # time-outs (index 2 and the last) have no true next observation: dropped, as d4rl does
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 10, 11, 20])
    # the terminal transition 11 keeps done = 1 and does not point at the next trajectory's start (20)
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 11, 11, 21])
    np.testing.assert_array_equal(data["dones"], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(data["rewards"], [1, 2, 10, 20, -1])


def test_returns_to_go_restart_at_every_trajectory_end_and_follow_the_kept_transitions():
    """G_t = r_t + gamma G_{t+1} within a trajectory, by hand with gamma = 0.5: (1, 2, 3 | time-out),
    (10, 20 | terminal), (-1, -2 | time-out) -> 2.75, 3.5, 3 | 20, 20 | -2, -2."""
    with_next = xo.qlearning_dataset({**RAW, "next_observations": NEXT}, gamma=0.5)
    np.testing.assert_allclose(with_next["returns_to_go"], [2.75, 3.5, 3, 20, 20, -2, -2])
    dropped = xo.qlearning_dataset(RAW, gamma=0.5)  # the time-outs without a next observation are dropped
    np.testing.assert_allclose(dropped["returns_to_go"], [2.75, 3.5, 20, 20, -2])


def test_episode_returns_split_at_terminals_and_timeouts():
    np.testing.assert_allclose(xo.episode_returns(RAW), [6, 30, -3])


def test_minari_dataset_loads_into_the_same_transitions(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = mk.rollout("Pendulum-v1", "random", episodes=3, seed=5, max_episode_steps=30)
    episodes[1]["terminations"][-1], episodes[1]["truncations"][-1] = True, False  # one terminated trajectory
    mk.write_minari("test/pendulum-v0", episodes, "Pendulum-v1", -1000.0, -100.0)
    mk.write_hdf5(str(tmp_path / "same.hdf5"), mk.episodes_to_d4rl(episodes), "Pendulum-v1")
    from_minari = xo.load_dataset("test/pendulum-v0")
    from_hdf5 = xo.load_dataset(str(tmp_path / "same.hdf5"))
    a, b = xo.qlearning_dataset(from_minari["raw"]), xo.qlearning_dataset(from_hdf5["raw"])
    assert len(a["rewards"]) == 90
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
    assert a["dones"].sum() == 1 and a["dones"][59] == 1
    assert from_minari["ref_scores"] == (-1000.0, -100.0)
    assert from_minari["eval_env"].recover_environment(eval_env=True).spec.id == "Pendulum-v1"


def test_dataset_tool_round_trips_episodes(tmp_path):
    episodes = mk.rollout("Pendulum-v1", "pendulum-expert", episodes=2, noise=0.1, seed=1)
    back = mk.d4rl_to_episodes(mk.episodes_to_d4rl(episodes))
    assert len(back) == 2
    for e, f in zip(episodes, back):
        for key in e:
            np.testing.assert_allclose(e[key], f[key], rtol=1e-6)
    assert episodes[0]["rewards"].sum() > -400  # the built-in controller swings up (random: about -1200)


def test_d4rl_normalized_score_matches_d4rl():
    assert xo.normalized_score(1500.0, *xo.D4RL_REF_SCORES["hopper"]) == pytest.approx(46.71, abs=0.005)
    assert xo.normalized_score(-20.272305, *xo.D4RL_REF_SCORES["hopper"]) == pytest.approx(0.0)
    assert xo.normalized_score(4592.3, *xo.D4RL_REF_SCORES["walker2d"]) == pytest.approx(100.0)


def test_gumbel_regression_on_one_state_drives_v_to_the_log_partition():
    """Lemma 3.2 with the script's own value network and loss: one state, four dataset actions
    with known Q, sampled equally often; V(s) -> beta * ln mean exp(Q/beta)."""
    torch.manual_seed(0)
    q = torch.tensor([1.0, 2.0, 5.0, -3.0])
    for beta in [0.5, 2.0]:
        vf = xo.Critic(3, 64, layer_norm=True)
        opt = torch.optim.Adam(vf.parameters(), lr=1e-3)
        s = torch.ones(256, 3)
        for _ in range(3000):
            target = q[torch.randint(0, 4, (256,))]
            opt.zero_grad()
            xo.gumbel_loss(vf(s), target, beta, 7.0).backward()
            opt.step()
        expected = beta * (torch.logsumexp(q / beta, 0) - math.log(4)).item()
        assert vf(s[:1]).item() == pytest.approx(expected, abs=0.05), beta
        assert vf(s[:1]).item() > q.mean().item() + 0.5  # a soft max, well above the mean Q


def test_offline_gumbel_clip_is_one_sided():
    pred = torch.zeros(2, requires_grad=True)
    xo.gumbel_loss(pred, torch.tensor([100.0, -100.0]), 1.0, 7.0).backward()
    assert pred.grad[0].item() == 0.0  # clipped from above: no gradient
    assert pred.grad[1].item() != 0.0  # far below is not clipped offline


def test_awr_weights_are_capped_and_eta_zero_is_behaviour_cloning():
    q, v = torch.tensor([0.0, 1.0, 10.0, -5.0]), torch.zeros(4)
    w = xo.awr_weights(q, v, 3.0, 100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), 100.0, math.exp(-15.0)]))
    torch.testing.assert_close(xo.awr_weights(q, v, 0.0, 100.0), torch.ones(4))
    log_prob = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    assert xo.awr_loss(log_prob, torch.ones(4)).item() == pytest.approx(2.5)  # BC: mean negative log-likelihood


def test_critic_target_terminations_and_timeouts():
    y = xo.critic_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([5.0, 5.0]), 0.9)
    torch.testing.assert_close(y, torch.tensor([5.5, 1.0]))


# ---------------------------------------------------------------------------------------------
# Plumbing: short real runs, bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory):
    """A mixed Pendulum-v1 dataset made with the dataset tool: good, epsilon-noisy and random play."""
    folder = tmp_path_factory.mktemp("data")
    episodes = (
        mk.rollout("Pendulum-v1", "pendulum-expert", episodes=20, noise=0.2, seed=0)
        + mk.rollout("Pendulum-v1", "pendulum-expert", episodes=10, epsilon=0.5, seed=100)
        + mk.rollout("Pendulum-v1", "random", episodes=20, seed=200)
    )
    path = folder / "pendulum-mix.hdf5"
    mk.write_hdf5(str(path), mk.episodes_to_d4rl(episodes), "Pendulum-v1", -1200.0, -140.0)
    return path, np.array([e["rewards"].sum() for e in episodes])


def test_end_to_end_logs_scores_saves_and_reloads(pendulum_data, workdir):
    path, _ = pendulum_data
    flags = f"--dataset {path} --total-timesteps 300 --batch-size 64 --log-frequency 50 --eval-frequency 150"
    proc = run_script(
        "xql_offline.py", [*flags.split(), "--eval-episodes", "2", "--save-model", "--seed", "4"], workdir, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(workdir)
    for tag in [
        "losses/value_loss",
        "losses/qf_loss",
        "losses/policy_loss",
        "losses/max_z",
        "losses/data_discounted_return",
        "charts/SPS",
        "charts/policy_learning_rate",
        "eval/episodic_return",
        "eval/normalized_score",
        "eval/reloaded_episodic_return",
    ]:
        assert scalars.get(tag), f"{tag} was not logged"
    lrs = [v for _, v in scalars["charts/policy_learning_rate"]]
    assert lrs[0] == pytest.approx(3e-4, rel=1e-3) and lrs[-1] < 0.1 * lrs[0]  # cosine decay to 0
    ret = [v for _, v in scalars["eval/episodic_return"]]
    score = [v for _, v in scalars["eval/normalized_score"]]
    np.testing.assert_allclose(score, xo.normalized_score(np.array(ret), -1200.0, -140.0), rtol=1e-4)
    (model,) = list(workdir.glob("runs/*/*.cleanrl_model"))
    returns = xo.evaluate(str(model), eval_episodes=2, seed=4 + 20_000)
    np.testing.assert_allclose(returns, [v for _, v in scalars["eval/reloaded_episodic_return"]], rtol=1e-5)


def test_d4rl_name_reads_the_cache_folder_and_infers_the_env(tmp_path, workdir, monkeypatch):
    """hopper-medium-v2 without d4rl: D4RL's cache file, Hopper-v5, D4RL's hopper reference scores."""
    rng = np.random.default_rng(0)
    n = 500
    raw = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": (np.arange(n) % 100 == 99),
    }
    write_raw(tmp_path / "hopper_medium-v2.hdf5", raw)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    flags = "--dataset hopper-medium-v2 --total-timesteps 20 --eval-frequency 20 --eval-episodes 1 --batch-size 16"
    proc = run_script("xql_offline.py", flags.split(), workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval env Hopper-v5" in proc.stdout and "normalized score" in proc.stdout


@pytest.mark.parametrize(
    "make, flags, names",
    [
        (None, ["--dataset", "missing.hdf5"], ["missing.hdf5", "does not exist"]),
        ("nokeys", ["--dataset", "nokeys.hdf5"], ["lacks the D4RL keys", "terminals", "timeouts"]),
        (None, ["--dataset", "nothere/absent-v0"], ["nothere/absent-v0", "minari download"]),
        (None, ["--dataset", "walker2d-medium-v2"], ["walker2d_medium-v2.hdf5", "download"]),
        ("pendulum", ["--dataset", "p.hdf5", "--env-id", "Hopper-v5"], ["(3,)", "(11,)", "--env-id"]),
        ("pendulum", ["--dataset", "p.hdf5", "--beta", "0"], ["--beta", "> 0"]),
        ("pendulum", ["--dataset", "p.hdf5", "--beta", "-2"], ["--beta"]),
        ("pendulum", ["--dataset", "p.hdf5", "--exp-clip", "0"], ["--exp-clip"]),
        ("pendulum", ["--dataset", "p.hdf5", "--reward-scale", "0"], ["--reward-scale", "> 0"]),
        ("pendulum", ["--dataset", "p.hdf5", "--env-id", "CartPole-v1"], ["CartPole-v1", "continuous"]),
        ("pendulum", ["--dataset", "p.hdf5", "--total-timesteps", "0"], ["--total-timesteps", ">= 1"]),
    ],
)
def test_bad_input_stops_before_training(make, flags, names, workdir, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(workdir / "empty-minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(workdir / "empty-d4rl"))
    if make == "nokeys":
        write_raw(workdir / "nokeys.hdf5", {"observations": OBS, "actions": RAW["actions"]})
    if make == "pendulum":
        mk.write_hdf5(
            str(workdir / "p.hdf5"), mk.episodes_to_d4rl(mk.rollout("Pendulum-v1", "random", 2)), "Pendulum-v1"
        )
    message = stops_with(xo, flags, workdir, monkeypatch)
    assert all(name in message for name in names), message


# ---------------------------------------------------------------------------------------------
# Learning, for real
# ---------------------------------------------------------------------------------------------
@pytest.mark.learning
def test_beats_the_dataset_and_behaviour_cloning(pendulum_data, workdir):
    """On a mix of good, epsilon-noisy and random Pendulum play, X-QL's policy must beat the data's mean
    return clearly, and beat behaviour cloning (the same script with AWR weights 1, --eta 0)."""
    path, dataset_returns = pendulum_data
    procs = {}
    for eta in [3.0, 0.0]:  # the two runs side by side, one thread each
        run_dir = workdir / f"eta{eta}"
        run_dir.mkdir()
        flags = f"--dataset {path} --seed 1 --total-timesteps 6000 --eval-frequency 6000 --eta {eta}"
        cmd = [sys.executable, str(ROOT / "xql_offline.py"), *flags.split(), "--eval-episodes", "20"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs[eta] = (
            run_dir,
            subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        )
    finals = {}
    for eta, (run_dir, proc) in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-3000:]
        finals[eta] = read_scalars(run_dir)["eval/episodic_return"][-1][1]
    xql, bc, data_mean = finals[3.0], finals[0.0], dataset_returns.mean()
    # measured (seed 1, one thread each, side by side): at 6000 steps X-QL -319 and BC -746; at
    # 12000, X-QL -350 and BC -715; the dataset's mean is -675
    assert xql > data_mean + 200, f"X-QL {xql:.0f} vs dataset mean {data_mean:.0f}"
    assert xql > bc + 200, f"X-QL {xql:.0f} vs BC {bc:.0f}"


# ---------------------------------------------------------------------------------------------
# D4RL file names, one reward scale for files and Minari, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, folder, file",
    [
        ("hopper-medium-v0", "gym_mujoco", "hopper_medium.hdf5"),
        ("hopper-medium-replay-v0", "gym_mujoco", "hopper_mixed.hdf5"),
        ("walker2d-medium-replay-v0", "gym_mujoco", "walker_mixed.hdf5"),
        ("halfcheetah-medium-expert-v0", "gym_mujoco", "halfcheetah_medium_expert.hdf5"),
        ("hopper-medium-v1", "gym_mujoco_v1", "hopper_medium-v1.hdf5"),
        ("walker2d-medium-replay-v1", "gym_mujoco_v1", "walker2d_medium_replay-v1.hdf5"),
        ("hopper-medium-replay-v2", "gym_mujoco_v2", "hopper_medium_replay-v2.hdf5"),
    ],
)
def test_d4rl_names_map_to_d4rl_files(name, folder, file):
    assert xo.d4rl_file(name) == (folder, file)


def test_d4rl_v0_file_laid_out_like_the_real_one_loads(tmp_path, workdir, monkeypatch):
    """hopper-medium-replay-v0 is D4RL's hopper_mixed.hdf5 (no version in the name): it is found in
    the cache folder, evaluated on Hopper, and scored with D4RL's hopper reference scores."""
    rng = np.random.default_rng(1)
    n = 300
    raw = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.arange(n) % 60 == 59,
        "timeouts": np.zeros(n, bool),
    }
    write_raw(tmp_path / "hopper_mixed.hdf5", raw)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    info = xo.load_dataset("hopper-medium-replay-v0")
    assert info["env_id"] == "Hopper-v5" and info["ref_scores"] == xo.D4RL_REF_SCORES["hopper"]
    np.testing.assert_array_equal(info["raw"]["observations"], raw["observations"])
    with pytest.raises(SystemExit, match="full-replay-v2"):
        xo.d4rl_file("hopper-full-replay-v0")


def test_minari_and_the_same_file_get_the_same_reward_scale_and_a_reloaded_eval(tmp_path, workdir, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = mk.rollout("Pendulum-v1", "random", episodes=4, seed=6, max_episode_steps=50)
    mk.write_minari("test/pendulum-scale-v0", episodes, "Pendulum-v1", -1000.0, -100.0)
    mk.write_hdf5(str(tmp_path / "same.hdf5"), mk.episodes_to_d4rl(episodes), "Pendulum-v1")
    flags = "--total-timesteps 40 --batch-size 16 --eval-frequency 40 --eval-episodes 1 --save-model".split()
    scales = []
    for dataset in ["test/pendulum-scale-v0", str(tmp_path / "same.hdf5")]:
        proc = run_script("xql_offline.py", ["--dataset", dataset, *flags], workdir, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scales.append(float(proc.stdout.split("reward scale ")[1].split(";")[0]))
        # the Minari dataset's own eval env is used for the reloaded model too, not skipped
        assert "reloaded: eval return" in proc.stdout
    expected = 1000.0 / np.ptp([e["rewards"].sum() for e in episodes])
    assert scales[0] == scales[1] == pytest.approx(expected, rel=1e-3)


def test_half_resume_half_equals_one_go(pendulum_data, tmp_path):
    path, _ = pendulum_data
    flags = f"--dataset {path} --batch-size 32 --eval-frequency 100 --eval-episodes 1 --seed 2 --save-model --no-cuda"
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir(), halves.mkdir()
    proc = run_script("xql_offline.py", [*flags.split(), "--total-timesteps", 200], straight, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("xql_offline.py", [*flags.split(), "--total-timesteps", 200, "--stop-at", 100], halves)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ckpt,) = list(halves.glob("runs/*/checkpoint.pt"))
    proc = run_script("xql_offline.py", ["--resume", str(ckpt)], halves, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = [torch.load(next(d.glob("runs/*/*.cleanrl_model")), weights_only=False) for d in (straight, halves)]
    for key in ["policy", "vf"]:
        for name, tensor in models[0][key].items():
            assert torch.equal(tensor, models[1][key][name]), f"{key}.{name} differs after resume"
    assert [s for s, _ in read_scalars(halves)["eval/episodic_return"]] == [99, 199]


def test_expectile_loss_is_minimised_at_the_expectile():
    """IQL's loss over a constant prediction: the mean at 0.5; for targets {0, 1} at e, the point where
    e (1 - p) = (1 - e) p, i.e. p = e; for any targets, the root of E[|e - 1(y < p)| (y - p)] = 0."""
    y = torch.tensor([0.0, 1.0])
    for e in [0.5, 0.7, 0.9]:
        grads = []
        for at in [e - 0.01, e, e + 0.01]:  # the loss's slope: negative, zero, positive around p = e
            p = torch.tensor(at, requires_grad=True)
            xo.expectile_loss(p.expand(2), y, e).backward()
            grads.append(p.grad.item())
        assert grads[0] < 0 and abs(grads[1]) < 1e-6 and grads[2] > 0, (e, grads)
    ys = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = torch.tensor(0.3)
    grad_at = lambda p: (torch.abs(0.7 - (ys < p).float()) * (ys - p)).mean()  # noqa: E731
    lo, hi = ys.min(), ys.max()
    for _ in range(60):  # bisection on the first-order condition
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad_at(mid) > 0 else (lo, mid)
    p = lo.clone().requires_grad_(True)
    xo.expectile_loss(p.expand(1000), ys, 0.7).backward()
    assert abs(p.grad.item()) < 1e-4 and lo > ys.mean() + 0.3  # above the mean, as a 0.7-expectile is


def test_iql_value_loss_runs_end_to_end(pendulum_data, workdir):
    path, _ = pendulum_data
    flags = f"--dataset {path} --value-loss expectile --total-timesteps 200 --batch-size 32 --eval-frequency 200"
    proc = run_script("xql_offline.py", [*flags.split(), "--eval-episodes", "1"], workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expectile 0.7" in proc.stdout
    assert read_scalars(workdir)["losses/value_loss"]


def test_dataset_tool_reads_a_runs_replay_buffer_and_its_policy(tmp_path):
    """A "medium-replay"-like dataset is the replay buffer of an online run, cut into its episodes; a
    "medium" one comes from rollouts of that run's policy. Pendulum truncates at 200 steps: 450 steps
    are two whole episodes and a cut one, none terminated, each transition's s' the next one's s."""
    flags = "--env-id Pendulum-v1 --total-timesteps 450 --learning-starts 100 --eval-frequency 450 --eval-episodes 1"
    proc = run_script("xql_sac.py", [*flags.split(), "--checkpoint-frequency", "450", "--no-cuda"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ckpt,) = list(tmp_path.glob("runs/*/checkpoint.pt"))
    episodes, env_id = mk.replay_episodes(str(ckpt))
    assert env_id == "Pendulum-v1" and [len(e["actions"]) for e in episodes] == [200, 200, 50]
    assert all(e["truncations"][-1] and not e["terminations"].any() for e in episodes)
    assert all(e["truncations"][:-1].sum() == 0 for e in episodes)
    rb = torch.load(ckpt, weights_only=False)["rb"]
    data = mk.episodes_to_d4rl(episodes)
    np.testing.assert_array_equal(data["observations"], rb["obs"].numpy())
    np.testing.assert_array_equal(data["next_observations"], rb["next_obs"].numpy())
    np.testing.assert_array_equal(data["rewards"], rb["rewards"].numpy())
    # the run's policy, as --policy checkpoint:PATH: the actor's mean action
    import gymnasium as gym

    import xql_sac

    env = gym.make("Pendulum-v1")
    act = mk.resolve_policy(f"checkpoint:{ckpt}", env)
    actor = xql_sac.Actor(3, env.action_space.low, env.action_space.high, 256)
    actor.load_state_dict(torch.load(ckpt, weights_only=False)["actor"])
    obs = np.array([0.6, 0.8, -1.0], dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(act(obs), actor.get_action(torch.as_tensor(obs)[None])[2][0].numpy())
    assert len(mk.rollout("Pendulum-v1", f"checkpoint:{ckpt}", episodes=1, max_episode_steps=20)[0]["actions"]) == 20


def test_replay_of_a_wrapped_buffer_starts_from_its_oldest_transition(tmp_path):
    """A full circular buffer (pos = 2 of 5) holds, oldest first, slots 2, 3, 4, 0, 1. Observations are
    numbered so that the order and the cuts show: 10 -> 11 -> 12 (terminated), then 20 -> 21 (last)."""
    obs = torch.tensor([[20.0], [21.0], [10.0], [11.0], [12.0]])
    next_obs = torch.tensor([[21.0], [22.0], [11.0], [12.0], [13.0]])
    rb = {
        "capacity": 5,
        "size": 5,
        "pos": 2,
        "obs": obs,
        "next_obs": next_obs,
        "actions": torch.zeros(5, 1),
        "rewards": torch.arange(5.0),
        "dones": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]),
    }
    path = tmp_path / "checkpoint.pt"
    torch.save({"script": "xql_sac.py", "args": {"env_id": "Pendulum-v1"}, "actor": {}, "rb": rb}, path)
    episodes, env_id = mk.replay_episodes(str(path))
    assert env_id == "Pendulum-v1"
    assert [e["observations"][:, 0].tolist() for e in episodes] == [[10, 11, 12, 13], [20, 21, 22]]
    assert [e["terminations"].tolist() for e in episodes] == [[False, False, True], [False, False]]
    assert episodes[1]["truncations"].tolist() == [False, True]
    assert episodes[0]["rewards"].tolist() == [2, 3, 4]


def test_replay_cut_to_its_first_transitions_and_refused_once_wrapped(tmp_path):
    """--replay-steps N keeps the first N transitions a run stored (D4RL's medium-replay: the buffer up
    to the medium policy); a buffer that has wrapped round no longer holds them."""
    rb = {"capacity": 6, "size": 4, "pos": 4, "obs": torch.tensor([[0.0], [1.0], [2.0], [3.0], [0], [0]]),
          "next_obs": torch.tensor([[1.0], [2.0], [3.0], [4.0], [0], [0]]), "actions": torch.zeros(6, 1),
          "rewards": torch.arange(6.0), "dones": torch.zeros(6)}
    path = tmp_path / "checkpoint.pt"
    torch.save({"script": "xql_sac.py", "args": {"env_id": "Pendulum-v1"}, "actor": {}, "rb": rb}, path)
    (episode,), _ = mk.replay_episodes(str(path), first=2)
    assert episode["observations"][:, 0].tolist() == [0, 1, 2] and episode["rewards"].tolist() == [0, 1]
    torch.save({"script": "xql_sac.py", "args": {"env_id": "Pendulum-v1"}, "actor": {},
                "rb": {**rb, "size": 6, "pos": 1}}, path)
    with pytest.raises(SystemExit, match="wrapped round"):
        mk.replay_episodes(str(path), first=2)


def test_d4rl_recipe_picks_the_best_policy_and_the_first_to_reach_a_third_of_its_score():
    # normalised = return here; a third of the best (90) is 30: step 20 (40) is the first to reach
    # it; not 30 (29, closer, a strong policy's bad evaluation), nor 50 (31, after the expert)
    evals = {10: 5.0, 20: 40.0, 30: 29.0, 40: 90.0, 50: 31.0}
    assert d4.choose_policies(evals, (0.0, 100.0)) == (40, 20)
    # on D4RL's hopper scale: the best 3234.3 scores 100, a third (33.3) is a return of 1064.9
    assert d4.choose_policies({1: 1060.0, 2: 1070.0, 3: 3234.3}, (-20.272305, 3234.3)) == (3, 2)
    assert d4.choose_policies({1: 50.0, 2: 20.0}, (0.0, 100.0)) == (None, None)


def test_d4rl_recipe_makes_four_datasets_from_one_sac_run_and_resumes(tmp_path, monkeypatch):
    """Two SAC chunks of 300 steps (stubbed evaluations rise, so the expert is step 600 and the medium
    step 300): medium and expert 200 sampled transitions each, medium-replay the 300 transitions the
    run stored up to the medium policy, medium-expert both. A second call trains and rolls out nothing."""
    monkeypatch.setattr(d4, "CHUNK", 300)
    flags = [("300" if f == "10000" else f) for f in d4.SAC_FLAGS]
    flags[flags.index("--eval-episodes") + 1] = "1"
    monkeypatch.setattr(d4, "SAC_FLAGS", [*flags, "--learning-starts", "100"])
    real = d4.evaluations
    monkeypatch.setattr(d4, "evaluations", lambda log: {k: v + k for k, v in real(log).items()})
    info = d4.make("Hopper-v5", str(tmp_path), 600, 200)
    assert (info["expert_step"], info["medium_step"]) == (600, 300)
    sizes = {name: s["transitions"] for name, s in info["datasets"].items()}
    assert sizes == {"hopper-medium": 200, "hopper-medium-replay": 300, "hopper-medium-expert": 400,
                     "hopper-expert": 200}
    data, attrs = mk.read_hdf5(str(tmp_path / "hopper-medium-replay.hdf5"))
    (ckpt,) = (tmp_path / "sac-Hopper-v5").glob("runs/*/checkpoint.pt")
    np.testing.assert_array_equal(data["observations"], torch.load(ckpt, weights_only=False)["rb"]["obs"][:300])
    assert (attrs["ref_min_score"], attrs["ref_max_score"]) == d4.D4RL_REF_SCORES["hopper"]
    medium = mk.read_hdf5(str(tmp_path / "hopper-medium.hdf5"))[0]
    expert = mk.read_hdf5(str(tmp_path / "hopper-expert.hdf5"))[0]
    both = mk.read_hdf5(str(tmp_path / "hopper-medium-expert.hdf5"))[0]
    np.testing.assert_array_equal(both["actions"], np.concatenate([medium["actions"], expert["actions"]]))
    assert medium["timeouts"][-1] and not medium["terminals"][-1]  # the step budget cuts its last episode
    mtime = os.path.getmtime(tmp_path / "hopper-medium.hdf5")
    run = subprocess.run
    monkeypatch.setattr(d4.subprocess, "run", None)  # nothing may be trained again
    assert d4.make("Hopper-v5", str(tmp_path), 600, 200)["datasets"] == info["datasets"]
    assert os.path.getmtime(tmp_path / "hopper-medium.hdf5") == mtime
    # from that summary, medium alone: SAC trains to the medium step only and the file is the same
    monkeypatch.setattr(d4.subprocess, "run", run)
    known = json.loads(json.dumps(info))  # the steps as a summary.json holds them
    again = d4.make("Hopper-v5", str(tmp_path / "again"), 10**6, 200, ["medium"], known)
    assert list(again["datasets"]) == ["hopper-medium"] and list(again["evaluations"]) == [300]
    assert not (tmp_path / "again/sac-Hopper-v5/snapshots/0000600.pt").exists()
    np.testing.assert_array_equal(mk.read_hdf5(str(tmp_path / "again/hopper-medium.hdf5"))[0]["actions"],
                                  medium["actions"])
    known["evaluations"]["300"] += 1  # another SAC run than the summary's: refused
    with pytest.raises(SystemExit, match="step 300"):
        d4.make("Hopper-v5", str(tmp_path / "again"), 10**6, 200, ["medium"], known)


def test_d4rl_recipe_trains_a_chunk_stopped_part_way_again_from_its_start(tmp_path, monkeypatch):
    """A SAC run stopped inside its second chunk (a checkpoint at step 450 of 300-600, as SIGTERM
    leaves it) gives the same step-600 actor as a run never stopped: MuJoCo's episode cannot be
    checkpointed, so resuming at 450 would start a new one there and make another run."""
    monkeypatch.setattr(d4, "CHUNK", 300)
    flags = [("300" if f == "10000" else f) for f in d4.SAC_FLAGS]
    flags[flags.index("--eval-episodes") + 1] = "1"
    monkeypatch.setattr(d4, "SAC_FLAGS", [*flags, "--learning-starts", "100"])
    stopped, never = tmp_path / "stopped" / "sac", tmp_path / "never" / "sac"
    d4.train_sac("Hopper-v5", str(stopped), 300)
    shutil.copytree(stopped, never)
    d4.train_sac("Hopper-v5", str(never), 600)
    (ckpt,) = stopped.glob("runs/*/checkpoint.pt")
    cmd = [sys.executable, str(ROOT / "xql_sac.py"), "--resume", str(ckpt), "--stop-at", "450", "--no-cuda"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    assert subprocess.run(cmd, cwd=stopped, env=env, capture_output=True).returncode == 0
    assert torch.load(ckpt, weights_only=False)["global_step"] == 450
    d4.train_sac("Hopper-v5", str(stopped), 600)
    actors = [torch.load(f / "snapshots/0000600.pt", weights_only=False)["actor"] for f in (stopped, never)]
    for name, weight in actors[0].items():
        torch.testing.assert_close(weight, actors[1][name], rtol=0, atol=0)


def test_sampled_sac_actions_vary_around_the_mean_and_repeat_with_the_seed(tmp_path):
    flags = "--env-id Pendulum-v1 --total-timesteps 150 --learning-starts 100 --eval-frequency 150 --eval-episodes 1"
    proc = run_script("xql_sac.py", [*flags.split(), "--save-model", "--no-cuda"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (model,) = tmp_path.glob("runs/*/*.cleanrl_model")
    mean = mk.rollout("Pendulum-v1", f"checkpoint:{model}", episodes=1, seed=3, max_episode_steps=20)[0]["actions"]
    drawn = [mk.rollout("Pendulum-v1", f"checkpoint:{model}", episodes=1, seed=3, max_episode_steps=20,
                        sample=True)[0]["actions"] for _ in range(2)]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert np.abs(drawn[0] - mean).mean() > 0.05


def test_reward_scale_flag_replaces_the_derived_scale(tmp_path, workdir):
    episodes = mk.rollout("Pendulum-v1", "random", episodes=2, seed=3, max_episode_steps=30)
    mk.write_hdf5(str(tmp_path / "p.hdf5"), mk.episodes_to_d4rl(episodes), "Pendulum-v1")
    flags = ["--dataset", str(tmp_path / "p.hdf5"), "--total-timesteps", "20", "--batch-size", "8"]
    flags += ["--eval-frequency", "20", "--eval-episodes", "1", "--reward-scale", "0.25"]
    proc = run_script("xql_offline.py", flags, workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("reward scale ")[1].split(";")[0]) == 0.25


def test_run_names_carry_the_dataset_name_without_folder_or_extension(tmp_path):
    (tmp_path / "mix.hdf5").write_bytes(b"")
    assert xo.dataset_name(str(tmp_path / "mix.hdf5")) == "mix"
    assert xo.dataset_name("data/hopper-good-noisy-random.hdf5") == "hopper-good-noisy-random"
    assert xo.dataset_name("hopper-medium-replay-v2") == "hopper-medium-replay-v2"
    assert xo.dataset_name("mujoco/hopper/medium-v0") == "mujoco-hopper-medium-v0"


def test_dataset_tool_writes_into_a_folder_it_creates(tmp_path):
    data = mk.episodes_to_d4rl(mk.rollout("Pendulum-v1", "random", episodes=1, seed=0))
    mk.write_hdf5(str(tmp_path / "data" / "r.hdf5"), data, "Pendulum-v1")
    assert mk.read_hdf5(str(tmp_path / "data" / "r.hdf5"))[1]["env_id"] == "Pendulum-v1"


@pytest.mark.parametrize("script", ["iq_continuous", "miq_continuous"])
def test_dataset_tool_rolls_out_the_mode_of_an_iq_policy(tmp_path, script):
    """`--policy checkpoint:FILE` takes IQ / M-IQ runs too: the policy's mode, mapped to the env's bins."""
    import gymnasium as gym

    module = __import__(script)
    env = gym.make("Pendulum-v1")
    policy = module.make_policy("multicategorical", 3, env.action_space.low, env.action_space.high, 5)
    args = {"policy": "multicategorical", "n_bins": 5, "env_id": "Pendulum-v1"}
    if script == "miq_continuous":
        args["alpha"] = 0.9
    torch.save({"script": f"{script}.py", "args": args, "policy": policy.state_dict()}, tmp_path / "m.cleanrl_model")
    act = mk.checkpoint_policy(str(tmp_path / "m.cleanrl_model"), env)
    obs = np.array([1.0, 0.0, 0.5], dtype=np.float32)
    expected = policy.to_env(policy.mode(torch.as_tensor(obs)[None]))[0].numpy()
    np.testing.assert_allclose(act(obs), expected)
    assert act(obs)[0] in (-2.0, -1.0, 0.0, 1.0, 2.0)
    with pytest.raises(SystemExit, match="xql_sac.py only"):  # --sample draws SAC's policy only
        mk.checkpoint_policy(str(tmp_path / "m.cleanrl_model"), env, sample=True)


def awr_fit_on_a_mix(eta: float, random_rows_noise: float, seed: int = 1, n: int = 600, steps: int = 200):
    """Fit xql_offline's policy by AWR on a generated mix: n rows each of a good action (best + noise 0.1),
    a noisy one (best + noise 0.5) and a uniform random one, with critic advantages = the true advantage
    -5 |a - best|^2 plus Gaussian error of std 1, or `random_rows_noise` on the random rows.
    Returns (mean |mean action - best action|, share of the total weight on the random rows)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(3 * n, 4, generator=g) * 2 - 1
    best = torch.tanh(obs @ torch.tensor([[0.8, -0.5], [0.3, 0.9], [-0.7, 0.2], [0.5, -0.6]]))
    act = best.clone()
    act[:n] += 0.1 * torch.randn(n, 2, generator=g)
    act[n : 2 * n] += 0.5 * torch.randn(n, 2, generator=g)
    act[2 * n :] = torch.rand(n, 2, generator=g) * 2 - 1
    act = act.clamp(-1, 1)
    error_std = torch.cat([torch.ones(2 * n), torch.full((n,), random_rows_noise)])
    adv = -5.0 * (act - best).pow(2).sum(-1) + error_std * torch.randn(3 * n, generator=g)
    weights = xo.awr_weights(adv, torch.zeros(3 * n), eta, 100.0)
    torch.manual_seed(seed)
    policy = xo.GaussianPolicy(4, np.array([-1.0, -1.0]), np.array([1.0, 1.0]), 64)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = xo.awr_loss(policy.log_prob(obs, act), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (policy(obs) - best).abs().mean().item(), (weights[2 * n :].sum() / weights.sum()).item()


def test_awr_at_the_papers_eta_follows_the_critics_error_on_random_rows_and_a_small_eta_does_not():
    """The documented cause of X-QL and IQL losing to BC on a good + noisy + random Hopper mix
    (docs/xql_offline.md): AWR's weights exp(eta * A), capped at 100, turn a critic's larger error on
    the random rows (measured there: advantage std 8-16 on random rows, 2-3 on the others) into most
    of the policy's weight; the paper's eta = 3 then ends further from the best action than BC,
    while --eta 0.2 ends closer. With the same error on every row, eta = 3 beats BC by far."""
    bc, _ = awr_fit_on_a_mix(0.0, 8.0)
    paper, random_share = awr_fit_on_a_mix(3.0, 8.0)
    gentle, _ = awr_fit_on_a_mix(0.2, 8.0)
    uniform_error, _ = awr_fit_on_a_mix(3.0, 1.0)
    assert random_share > 0.5  # a third of the rows, most of the weight
    assert paper > bc + 0.015, (paper, bc)
    assert gentle < bc - 0.03, (gentle, bc)
    assert uniform_error < bc / 2, (uniform_error, bc)


def test_d4rl_recipe_refuses_a_missing_policies_file_before_training(tmp_path):
    out = subprocess.run([sys.executable, str(Path(_ROOT) / "tools" / "make_d4rl_datasets.py"), "--envs", "Hopper-v5",
                          "--datasets", "medium", "--policies-from", str(tmp_path / "absent.json"),
                          "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--policies-from" in out.stderr and "is not a file" in out.stderr
    assert not (tmp_path / "d").exists()
