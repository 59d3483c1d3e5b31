"""Tests of soft_dqn_atari.py (Schulman, Chen, Abbeel 2017, Section 6.2)."""

import math
import sys

import numpy as np
import pytest
import torch
import tyro
from conftest import read_scalars, run_script, stops_with

import soft_dqn_atari as sd


def one_step(q_next, r=0.5, done=0.0, gamma=0.99, tau=0.1, target="entropy"):
    B = q_next.shape[0]
    col = lambda v: torch.full((B, 1), v, dtype=q_next.dtype)  # noqa: E731
    return sd.nstep_target(col(r), col(done), col(done), q_next.unsqueeze(1), gamma, tau, target)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def test_entropy_minus_kl_target_is_gamma_tau_ln_num_actions():
    torch.manual_seed(0)
    q = torch.randn(16, 6, dtype=torch.float64) * 3
    for tau in [0.01, 0.1, 1.0]:
        diff = one_step(q, tau=tau, target="entropy") - one_step(q, tau=tau, target="kl")
        torch.testing.assert_close(
            diff, torch.full((16,), 0.99 * tau * math.log(6), dtype=torch.float64), rtol=0, atol=1e-12
        )
    # and the termination mask removes the whole bootstrap, regulariser included
    torch.testing.assert_close(one_step(q, done=1.0, target="entropy"), torch.full((16,), 0.5, dtype=torch.float64))


def test_soft_targets_approach_the_hard_one_as_tau_goes_to_zero():
    torch.manual_seed(1)
    q = torch.randn(32, 4, dtype=torch.float64)
    hard = one_step(q, target="hard")
    torch.testing.assert_close(hard, 0.5 + 0.99 * q.max(1).values)
    gaps = []
    for tau in [1.0, 0.1, 0.01, 0.001]:
        for target in ["entropy", "kl"]:
            gap = (one_step(q, tau=tau, target=target) - hard).abs().max().item()
            assert gap <= 0.99 * tau * math.log(4) + 1e-12  # LSE - max lies in [0, tau ln|A|]
            if target == "entropy":
                gaps.append(gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 3e-3


def test_no_overflow_for_q_over_tau_around_1e4():
    q = torch.tensor([[1000.0, 999.0, -1000.0], [-1000.0, -1000.0, -1000.0]])  # Q/tau up to 1e4 at tau = 0.1
    for target in ["entropy", "kl"]:
        y = one_step(q, r=0.0, gamma=1.0, tau=0.1, target=target)
        assert torch.isfinite(y).all()
        shift = 0.0 if target == "entropy" else -0.1 * math.log(3)
        # the first row's soft max is its max (the others are 10 and 2e4 tau below); the second's is
        # max + tau ln 3 for three equal values
        assert y[0].item() == pytest.approx(1000.0 + 0.1 * math.log1p(math.exp(-10)) + shift, abs=1e-3)
        assert y[1].item() == pytest.approx(-1000.0 + 0.1 * math.log(3) + shift, abs=1e-3)
        e = sd.regularizer(q * 10, 0.1, target)
        assert torch.isfinite(e).all()


def nstep_by_hand(rewards, dones, ends, v, e, gamma):
    """Eq. 46 written out: j = first end (inclusive) or n; intermediate regularisers e(s_{t+k}), k < j."""
    n = len(rewards)
    j = next((k + 1 for k in range(n) if ends[k]), n)
    y = rewards[0]
    for k in range(1, j):
        y += gamma**k * (rewards[k] + e[k - 1])
    return y + gamma**j * (1 - dones[j - 1]) * v[j - 1]


@pytest.mark.parametrize("target", ["hard", "entropy", "kl"])
@pytest.mark.parametrize(
    "ends, dones",
    [
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # no end inside the window: bootstrap from s_{t+4}
        ([0, 1, 0, 0], [0, 1, 0, 0]),  # termination at s_{t+2}: two rewards, one regulariser, no bootstrap
        ([0, 1, 0, 0], [0, 0, 0, 0]),  # truncation at s_{t+2}: bootstrap from that final state
        ([1, 0, 0, 0], [1, 0, 0, 0]),  # terminal after one step: just r_t
    ],
)
def test_nstep_target_matches_a_hand_computation(target, ends, dones):
    torch.manual_seed(2)
    gamma, tau, n = 0.9, 0.3, 4
    rewards = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    q_next = torch.randn(1, n, 5, dtype=torch.float64)  # Q_bar(s_{t+1}) .. Q_bar(s_{t+4})
    # V and e per state, written independently of the script's helpers
    if target == "hard":
        v, e = q_next[0].max(-1).values, torch.zeros(n, dtype=torch.float64)
    else:
        lse = tau * torch.log(torch.exp(q_next[0] / tau).sum(-1))
        pi = torch.exp((q_next[0] - lse[:, None]) / tau)
        entropy = -(pi * torch.log(pi)).sum(-1)
        v = lse if target == "entropy" else lse - tau * math.log(5)
        e = tau * entropy if target == "entropy" else -tau * (math.log(5) - entropy)
    expected = nstep_by_hand(rewards[0].tolist(), dones, ends, v.tolist(), e.tolist(), gamma)
    y = sd.nstep_target(
        rewards,
        torch.tensor([dones], dtype=torch.float64),
        torch.tensor([ends], dtype=torch.float64),
        q_next,
        gamma,
        tau,
        target,
    )
    assert y.item() == pytest.approx(expected, abs=1e-10)


def test_nstep_termination_example_written_out():
    """ends at s_{t+2} by termination, hard target: y = r_t + gamma r_{t+1}, whatever Q_bar says."""
    y = sd.nstep_target(
        torch.tensor([[1.0, 2.0, 4.0]]),
        torch.tensor([[0.0, 1.0, 0.0]]),
        torch.tensor([[0.0, 1.0, 0.0]]),
        torch.full((1, 3, 2), 100.0),
        0.5,
        0.1,
        "hard",
    )
    assert y.item() == pytest.approx(1.0 + 0.5 * 2.0)
    # the same window truncated at s_{t+2}: + gamma^2 * max Q_bar(s_{t+2}) = 0.25 * 100
    y = sd.nstep_target(
        torch.tensor([[1.0, 2.0, 4.0]]),
        torch.tensor([[0.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 1.0, 0.0]]),
        torch.full((1, 3, 2), 100.0),
        0.5,
        0.1,
        "hard",
    )
    assert y.item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 100.0)


@pytest.mark.parametrize("target", ["hard", "kl"])
def test_target_q_next_gives_the_full_forwards_target(target):
    """The hard n-step target evaluates Q_bar only at each window's bootstrap state; the target it
    gives equals the one from Q_bar at every next state, ends and terminations included."""
    torch.manual_seed(0)
    B, n = 64, 5
    net = sd.QNetwork(4)
    next_obs = torch.randint(0, 256, (B, n, 4, 84, 84), dtype=torch.uint8)
    ends = (torch.rand(B, n) < 0.15).double()
    dones = ends * (torch.rand(B, n) < 0.5).double()
    rewards = torch.randn(B, n, dtype=torch.float64)
    assert 0 < ends.any(1).sum() < B and dones.sum() > 0
    with torch.no_grad():
        full = net(next_obs.flatten(0, 1)).view(B, n, -1).double()
        fast = sd.target_q_next(net, next_obs, ends, target).double()
    y_full = sd.nstep_target(rewards, dones, ends, full, 0.99, 0.1, target)
    y_fast = sd.nstep_target(rewards, dones, ends, fast, 0.99, 0.1, target)
    torch.testing.assert_close(y_fast, y_full, rtol=1e-5, atol=1e-5)
    if target == "hard":
        assert (fast == 0).all(-1).sum() >= B * (n - 1)  # one evaluated state per window


# ---------------------------------------------------------------------------------------------
# Replay: stacks rebuilt from single frames equal what the agent observed
# ---------------------------------------------------------------------------------------------
def test_replay_stacks_equal_the_observed_stacks_across_resets_and_wraparound():
    env = sd.make_env("breakout", 1, seed=0, sticky=False, episodic_life=True, max_frames=600)
    rng = np.random.default_rng(0)
    rb = sd.FrameReplayBuffer(capacity=700)
    observed, next_observed, ends = [], [], []
    obs, _ = env.reset(seed=0)
    rb.start_episode(obs[0])
    for _ in range(2500):
        action = rng.integers(0, 4, 1)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        observed.append(obs[0].copy())
        next_observed.append(next_obs[0].copy())
        ends.append(bool(terminated[0] or truncated[0]))
        rb.add(int(action[0]), float(np.sign(reward[0])), bool(terminated[0]), bool(truncated[0]), next_obs[0, -1])
        obs = next_obs
        if terminated[0] or truncated[0]:
            obs, *_ = env.step(np.zeros(1, dtype=np.int64))
            rb.start_episode(obs[0])
    assert sum(ends) >= 10 and rb.frame_count > 3 * rb.capacity  # many resets, several wrap-arounds
    n = 3
    ids = np.concatenate([rb.sample_ids(256, n, rng) for _ in range(20)])
    assert ids.min() >= rb.count - rb.capacity
    batch_checked, crossings = 0, 0
    for t in np.unique(ids):
        np.testing.assert_array_equal(rb.stacks(rb.newest[t % rb.capacity]), observed[t])
        for k in range(n):
            np.testing.assert_array_equal(rb.stacks(rb.newest[t % rb.capacity] + k + 1), next_observed[t + k])
            if ends[t + k]:
                crossings += 1
                break
        batch_checked += 1
    assert batch_checked > 300 and crossings > 10
    batch = rb.sample(64, n, rng)  # and the batch layout the training step reads
    assert batch["obs"].shape == (64, 4, 84, 84) and batch["next_obs"].shape == (64, n, 4, 84, 84)


def test_replay_buffer_size_for_one_million_transitions():
    rb = sd.FrameReplayBuffer(capacity=1_000_000)
    assert rb.nbytes / 1e9 < 7.2  # 1M frames of 84x84 plus the per-transition arrays (np.zeros: not touched)


# ---------------------------------------------------------------------------------------------
# Learning, for real, with the script's network, target and training step
# ---------------------------------------------------------------------------------------------
N_ACTIONS = 4


def frames(kind: str, correct: np.ndarray, rng) -> np.ndarray:
    """(B,4,84,84) uint8: noise plus, in stage A, a bright bar in the column block of the correct action;
    stage B: a bright horizontal band; end: noise only (never bootstrapped from)."""
    x = rng.integers(0, 60, size=(len(correct), 84, 84), dtype=np.uint8)
    if kind == "A":
        for i, c in enumerate(correct):
            x[i, 10:40, 21 * c : 21 * c + 20] = 255
    elif kind == "B":
        x[:, 60:75, :] = 255
    return np.repeat(x[:, None], 4, axis=1)


def synthetic_batch(batch_size: int, rng) -> dict:
    """A two-stage task that needs bootstrapping: in stage A the correct action (visible as the bar)
    costs -0.5 but leads to stage B, where every action earns +1 and ends the episode; a wrong action
    ends it with 0. So Q(A, correct) = -0.5 + gamma V(B) > 0 = Q(A, wrong) only through the target
    network; a sign error or a target network that is never synced gives the wrong answer."""
    half = batch_size // 2
    correct = rng.integers(0, N_ACTIONS, half)
    actions = rng.integers(0, N_ACTIONS, half)
    hit = actions == correct
    next_a = np.where(hit[:, None, None, None], frames("B", correct, rng), frames("end", correct, rng))
    obs = np.concatenate([frames("A", correct, rng), frames("B", correct, rng)])
    return {
        "obs": torch.as_tensor(obs),
        "actions": torch.as_tensor(np.concatenate([actions, rng.integers(0, N_ACTIONS, half)])),
        "rewards": torch.as_tensor(np.concatenate([np.where(hit, -0.5, 0.0), np.ones(half)]), dtype=torch.float32)[
            :, None
        ],
        "dones": torch.as_tensor(np.concatenate([~hit, np.ones(half, bool)]))[:, None],
        "ends": torch.as_tensor(np.concatenate([~hit, np.ones(half, bool)]))[:, None],
        "next_obs": torch.as_tensor(np.concatenate([next_a, frames("end", correct, rng)]))[:, None],
    }


def train_synthetic(target: str, updates: int = 600, sync_every: int | None = 100, seed: int = 0) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    q_network, target_network = sd.QNetwork(N_ACTIONS), sd.QNetwork(N_ACTIONS)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=2.5e-4)
    for step in range(updates):
        batch = synthetic_batch(32, rng)  # the script's gradient step, written as in its loop
        with torch.no_grad():
            q_next = sd.target_q_next(target_network, batch["next_obs"], batch["ends"], target)
            y = sd.nstep_target(batch["rewards"], batch["dones"], batch["ends"], q_next, 0.99, 0.1, target)
        q_sa = q_network(batch["obs"]).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
        loss = sd.td_loss(q_sa, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if sync_every and step % sync_every == 0:
            target_network.load_state_dict(q_network.state_dict())
    correct = rng.integers(0, N_ACTIONS, 400)
    with torch.no_grad():
        greedy = q_network(torch.as_tensor(frames("A", correct, rng))).argmax(1).numpy()
    return float((greedy == correct).mean())


@pytest.mark.learning
@pytest.mark.parametrize("target", ["hard", "entropy", "kl"])
def test_synthetic_task_is_learned_for_each_target(target):
    accuracy = train_synthetic(target)
    assert accuracy >= 0.95, f"{target}: accuracy {accuracy:.3f}"


@pytest.mark.learning
def test_synthetic_task_needs_a_working_target_network():
    """The control: with a target network that is never synced, the same training fails."""
    accuracy = train_synthetic("entropy", sync_every=None)
    assert accuracy < 0.5, f"accuracy {accuracy:.3f} without target syncs: the task does not test bootstrapping"


# ---------------------------------------------------------------------------------------------
# Plumbing: a real ALE game, bad input
# ---------------------------------------------------------------------------------------------
def test_episodic_life_ends_a_training_episode_at_a_life_loss_and_the_game_goes_on(workdir):
    """DeepMind's episodic life: each life lost is a termination, the game continues with one life
    fewer (the next step is an ordinary one, not a reset), and the logged game is the whole game.
    (ale-py's own `episodic_life` restarts the game at every life lost.)"""
    env = sd.make_env("breakout", 1, seed=0, sticky=False, episodic_life=True)
    env.reset(seed=0)
    rng, lives_after, frames_on = np.random.default_rng(0), [], []
    while len(lives_after) < 5:
        _, _, terminated, _, info = env.step(rng.integers(0, 4, 1))
        if terminated[0]:
            lives_after.append(int(info["lives"][0]))
            before = int(info["episode_frame_number"][0])
            _, _, _, _, info = env.step(np.zeros(1, dtype=np.int64))
            frames_on.append(int(info["episode_frame_number"][0]) - before)
    assert lives_after == [4, 3, 2, 1, 0]
    assert frames_on[:4] == [4, 4, 4, 4]  # after a life lost: one more step of the same game
    flags = (
        "--env-id BreakoutNoFrameskip-v4 --episodic-life --total-timesteps 1500 --buffer-size 2000 "
        "--learning-starts 1000 --eval-frequency 1500 --eval-episodes 1 --max-episode-frames 4000 --seed 1"
    )
    proc = run_script("soft_dqn_atari.py", flags.split(), workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lengths = [v for _, v in read_scalars(workdir)["charts/episodic_length"]]
    # a random Breakout game lasts about 150 agent steps, a single life about 30
    assert len(lengths) >= 5 and min(lengths) > 60 and np.mean(lengths) > 100, lengths


def test_evaluation_lengths_show_a_greedy_policy_that_never_fires():
    """Evaluation plays whole games, so after a life lost only the policy can press FIRE. A network
    whose greedy action is NOOP (all weights 0: argmax of ties) never launches the ball again, and
    every game runs to the frame cap (2000 frames = 500 agent steps); a uniform policy fires and its
    games end sooner."""
    q_network = sd.QNetwork(4)
    for p in q_network.parameters():
        torch.nn.init.zeros_(p)
    cpu = torch.device("cpu")
    returns, lengths = sd.evaluate_policy(q_network, "breakout", 2, 0.0, 0, cpu, max_frames=2000)
    assert list(lengths) == [500, 500] and list(returns) == [0.0, 0.0]
    returns, lengths = sd.evaluate_policy(q_network, "breakout", 3, 1.0, 0, cpu, max_frames=2000)
    assert len(lengths) == 3 and max(lengths) < 500, lengths


def test_end_to_end_breakout_logs_saves_and_reloads(workdir):
    flags = (
        "--env-id BreakoutNoFrameskip-v4 --total-timesteps 2000 --buffer-size 1000 --learning-starts 500 "
        "--train-frequency 4 --log-frequency 10 --eval-frequency 2000 --eval-episodes 1 "
        "--max-episode-frames 2000 --n-step 3 --target kl --save-model --seed 2"
    )
    proc = run_script("soft_dqn_atari.py", flags.split(), workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replay buffer 1000 frames" in proc.stdout
    scalars = read_scalars(workdir)
    for tag in [
        "charts/episodic_return",
        "charts/SPS",
        "losses/td_loss",
        "losses/q_values",
        "eval/episodic_return",
        "eval/episodic_length",
        "eval/reloaded_episodic_return",
    ]:
        assert scalars.get(tag), f"{tag} was not logged"
    assert all(math.isfinite(v) for _, v in scalars["losses/td_loss"])
    (model,) = list(workdir.glob("runs/*/*.cleanrl_model"))
    returns = sd.evaluate(str(model), eval_episodes=1, seed=2 + 20_000, max_frames=2000)
    np.testing.assert_allclose(returns, [v for _, v in scalars["eval/reloaded_episodic_return"]])


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--env-id", "CartPole-v1"], ["CartPole-v1", "Atari"]),
        (["--env-id", "Pendulum-v1"], ["Pendulum-v1", "continuous control"]),
        (["--env-id", "ALE/Breakout-ram-v5"], ["image observations"]),
        (["--tau", "0"], ["--tau", "> 0"]),
        (["--target", "kl", "--tau", "-1"], ["--tau"]),
        (["--n-step", "0"], ["--n-step", "at least 1"]),
        (["--eval-frequency", "0"], ["--eval-frequency", ">= 1"]),
        (["--total-timesteps", "1000", "--learning-starts", "1000"], ["--learning-starts", "no gradient step"]),
        (["--checkpoint-frequency", "-1"], ["--checkpoint-frequency", ">= 0"]),
        (["--resume", "nowhere.pt"], ["--resume nowhere.pt", "no such file"]),
        (["--eval-model", "nowhere.pt"], ["--eval-model nowhere.pt", "no such file"]),
    ],
)
def test_bad_input_stops_before_training(flags, names, tmp_path, monkeypatch):
    message = stops_with(sd, flags, tmp_path, monkeypatch)
    assert all(name in message for name in names), message


def test_target_network_is_copied_every_target_network_frequency_steps(tmp_path, monkeypatch):
    """CleanRL copies the target network every --target-network-frequency steps whatever
    --train-frequency is; copying inside the training branch made the period their lcm (30 here)."""
    copies = []
    original = sd.QNetwork.load_state_dict
    monkeypatch.setattr(sd.QNetwork, "load_state_dict", lambda self, *a, **k: copies.append(1) or original(self, *a, **k))
    monkeypatch.chdir(tmp_path)
    flags = "--total-timesteps 200 --learning-starts 100 --train-frequency 3 --target-network-frequency 10 "
    flags += "--buffer-size 500 --batch-size 8 --eval-frequency 1000 --eval-episodes 1 --max-episode-frames 400"
    monkeypatch.setattr(sys, "argv", ["soft_dqn_atari.py", *flags.split()])
    sd.train(tyro.cli(sd.Args, args=flags.split()))
    assert len(copies) == 1 + 10  # the copy at start, then steps 100, 110, ..., 190


def test_warm_up_says_where_it_departs_from_cleanrl():
    """Uniform random actions before learning starts, as baselines' DQN; CleanRL acts epsilon-greedy
    from the first step. The line says so."""
    source = open(sd.__file__).read()
    assert "CleanRL acts epsilon-greedy" in source.split("if global_step < args.learning_starts")[0][-400:]


def test_atari_ids_resolve_to_games():
    assert sd.atari_game("BreakoutNoFrameskip-v4") == "breakout"
    assert sd.atari_game("ALE/SpaceInvaders-v5") == "space_invaders"
    assert sd.atari_game("pong") == "pong"
