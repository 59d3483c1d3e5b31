"""Tests of soft_a2c_atari.py (Schulman, Chen, Abbeel 2017, Sections 6.1 and 6.3)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import read_scalars, run_script, stops_with

import soft_a2c_atari as sa


# ---------------------------------------------------------------------------------------------
# Eq. 65: the expected soft-Q gradient is tau * grad L_policy + grad L_value
# ---------------------------------------------------------------------------------------------
def expected_gradients(regularizer: str, adv_scale: float, value_scale: float, vf_coef: float, scale_a2c: float):
    """Gradients of (1) the soft-Q loss and (2) scale_a2c * A2C's proper loss (value weight vf_coef), each
    as an exact expectation over actions: every action of every state enumerated, weighted by pi (detached),
    with a one-step target y(s, a) = r + gamma V(s') that does not depend on the parameters."""
    torch.manual_seed(0)
    tau, n_states, n_actions = 0.3, 3, 4
    agent = sa.Agent(n_actions).double()
    obs = torch.randint(0, 256, (n_states, 4, 84, 84), dtype=torch.uint8)
    y = torch.randn(n_states, n_actions, dtype=torch.float64)  # r(s,a) + gamma V(s'(s,a)), fixed
    grads = []
    for which in ["soft-q", "a2c"]:
        agent.zero_grad()
        logits, values = agent(obs)
        pi = torch.softmax(logits, -1).detach()
        rep = lambda x: x.repeat_interleave(n_actions, 0)  # noqa: E731  (state i, action a) pairs
        actions = torch.arange(n_actions).repeat(n_states)
        if which == "soft-q":
            loss, _ = sa.soft_q_loss(
                rep(logits),
                rep(values),
                actions,
                y.flatten(),
                tau,
                regularizer,
                adv_scale,
                value_scale,
                weights=pi.flatten(),
            )
        else:  # proper one-step return: r - tau p(s) + gamma V(s') = y - tau p(s)
            returns = (y - tau * sa.penalty(logits.detach(), regularizer)[:, None]).flatten()
            loss, _ = sa.a2c_loss(
                rep(logits), rep(values), actions, returns, tau, vf_coef, regularizer, weights=pi.flatten()
            )
            loss = scale_a2c * loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in agent.parameters()]))
    return grads, tau


@pytest.mark.parametrize("regularizer", ["kl", "entropy"])
def test_eq65_soft_q_expected_gradient_is_tau_policy_plus_value(regularizer):
    # unscaled soft-Q gradient == tau * grad(L_policy + (1/tau) L_value) = tau grad L_policy + grad L_value
    tau = 0.3
    (g_soft_q, g_a2c), _ = expected_gradients(regularizer, 1.0, 1.0, vf_coef=1 / tau, scale_a2c=tau)
    assert g_soft_q.abs().max() > 1e-3
    torch.testing.assert_close(g_soft_q, g_a2c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("regularizer", ["kl", "entropy"])
def test_eq65_with_1_over_tau_and_c_scalings_equals_a2c_proper_with_value_coefficient_c(regularizer):
    tau, c = 0.3, 0.5
    (g_soft_q, g_a2c), _ = expected_gradients(regularizer, 1 / tau, c, vf_coef=c, scale_a2c=1.0)
    torch.testing.assert_close(g_soft_q, g_a2c, rtol=1e-9, atol=1e-12)
    # and the check can fail: the unscaled soft-Q gradient is not A2C's with c
    (g_plain, _), _ = expected_gradients(regularizer, 1.0, 1.0, vf_coef=c, scale_a2c=1.0)
    assert not torch.allclose(g_plain, g_a2c, rtol=1e-3)


def test_penalties_kl_and_entropy_differ_by_ln_num_actions():
    logits = torch.randn(5, 6)
    torch.testing.assert_close(sa.penalty(logits, "kl") - sa.penalty(logits, "entropy"), torch.full((5,), math.log(6)))
    assert (sa.penalty(logits, "kl") >= 0).all()
    torch.testing.assert_close(sa.penalty(torch.zeros(2, 6), "kl"), torch.zeros(2), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# n-step returns
# ---------------------------------------------------------------------------------------------
def column(*xs):
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def test_nstep_returns_by_hand_with_a_termination_and_a_truncation():
    g, tau = 0.9, 0.5
    r = column(1.0, 2.0, 3.0, 4.0, 5.0)
    p = column(0.1, 0.2, 0.3, 0.4, 0.5)
    # s_2 terminal (after step 1); s_4 a truncation (after step 3) with V(final obs) = 7; V(s_5) = 10
    dones, ends = column(0, 1, 0, 0, 0), column(0, 1, 0, 1, 0)
    final_values = column(0, 0, 0, 7.0, 0)
    next_values = torch.tensor([10.0], dtype=torch.float64)
    naive = sa.nstep_returns(r, p, dones, ends, next_values, final_values, g, tau, "naive")[:, 0]
    proper = sa.nstep_returns(r, p, dones, ends, next_values, final_values, g, tau, "proper")[:, 0]
    soft_q = sa.nstep_returns(r, p, dones, ends, next_values, final_values, g, tau, "soft-q")[:, 0]
    expected_naive = [1 + g * 2, 2.0, 3 + g * (4 + g * 7), 4 + g * 7, 5 + g * 10]
    torch.testing.assert_close(naive, torch.tensor(expected_naive, dtype=torch.float64))
    # proper: every reward inside the return loses tau p of its own state (the bootstraps are V's)
    rt = [1 - tau * 0.1, 2 - tau * 0.2, 3 - tau * 0.3, 4 - tau * 0.4, 5 - tau * 0.5]
    expected_proper = [rt[0] + g * rt[1], rt[1], rt[2] + g * (rt[3] + g * 7), rt[3] + g * 7, rt[4] + g * 10]
    torch.testing.assert_close(proper, torch.tensor(expected_proper, dtype=torch.float64))
    # naive and proper differ exactly by the discounted KL terms inside the episode
    kl_terms = torch.tensor([0.1 + g * 0.2, 0.2, 0.3 + g * 0.4, 0.4, 0.5], dtype=torch.float64)
    torch.testing.assert_close(naive - proper, tau * kl_terms)
    # the soft-Q target omits the penalty of s_t itself (Eq. 47)
    torch.testing.assert_close(soft_q - proper, tau * p[:, 0])


# ---------------------------------------------------------------------------------------------
# Learning, for real, with the script's network, losses and update
# ---------------------------------------------------------------------------------------------
def bandit_frames(correct: np.ndarray, rng) -> torch.Tensor:
    x = rng.integers(0, 60, size=(len(correct), 84, 84), dtype=np.uint8)
    for i, c in enumerate(correct):
        x[i, 10:40, 21 * c : 21 * c + 20] = 255
    return torch.as_tensor(np.repeat(x[:, None], 4, axis=1))


def update(agent, optimizer, rollout: dict, args) -> None:
    """One update of the script's loop on a rollout: its returns (Eqs. 79/80/47), loss and step."""
    T, N = rollout["actions"].shape
    logits, values = agent(rollout["obs"].flatten(0, 1))
    with torch.no_grad():
        penalties = sa.penalty(logits.detach(), args.regularizer).view(T, N)
        kind = "soft-q" if args.update == "soft-q" else args.objective
        ends = (rollout["dones"], rollout["ends"], agent(rollout["next_obs"])[1], rollout["final_values"])
        returns = sa.nstep_returns(rollout["rewards"], penalties, *ends, args.gamma, args.tau, kind).flatten()
    actions = rollout["actions"].flatten()
    if args.update == "soft-q":
        scales = (1.0 / args.tau, args.value_grad_scale)
        loss, _ = sa.soft_q_loss(logits, values, actions, returns, args.tau, args.regularizer, *scales)
    else:
        loss, _ = sa.a2c_loss(logits, values, actions, returns, args.tau, args.vf_coef, args.regularizer)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()


def train_bandit(update_rule: str, updates: int = 250, seed: int = 0) -> float:
    """A task of 84x84 frames whose rewarded action (1 of 4) is the column of a bright bar; each step is a
    one-step episode with reward 1 for that action. Returns the expected reward of pi on fresh frames."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    agent = sa.Agent(4)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=7e-4, alpha=0.99, eps=1e-5)
    args = SimpleNamespace(
        gamma=0.99,
        tau=0.01,
        objective="proper",
        regularizer="kl",
        update=update_rule,
        vf_coef=0.5,
        adv_grad_scale=None,
        value_grad_scale=0.5,
        max_grad_norm=0.5,
    )
    T, N = 5, 16
    for _ in range(updates):
        correct = rng.integers(0, 4, T * N)
        obs = bandit_frames(correct, rng)
        with torch.no_grad():
            actions = torch.distributions.Categorical(logits=agent(obs)[0]).sample()
        ones = torch.ones(T, N)
        rollout = {
            "obs": obs.view(T, N, 4, 84, 84),
            "actions": actions.view(T, N),
            "rewards": torch.as_tensor(actions.numpy() == correct, dtype=torch.float32).view(T, N),
            "dones": ones,
            "ends": ones,
            "final_values": torch.zeros(T, N),
            "next_obs": bandit_frames(rng.integers(0, 4, N), rng),
        }
        update(agent, optimizer, rollout, args)
    correct = rng.integers(0, 4, 400)
    with torch.no_grad():
        pi = torch.softmax(agent(bandit_frames(correct, rng))[0], -1)
    return pi[torch.arange(400), torch.as_tensor(correct)].mean().item()


@pytest.mark.learning
@pytest.mark.parametrize("update_rule", ["pg", "soft-q"])
def test_synthetic_task_is_learned_by_both_update_rules(update_rule):
    expected_reward = train_bandit(update_rule)
    assert expected_reward >= 0.95, f"{update_rule}: expected reward {expected_reward:.3f} of optimal 1"


# ---------------------------------------------------------------------------------------------
# Plumbing: a real ALE game, bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.learning
def test_hidden_units_stay_alive_on_breakout_at_the_defaults(workdir):
    """A network that has gone dead cannot learn: with PyTorch's default init, after 12k Breakout steps
    at the defaults (16 envs, RMSprop 7e-4) 89% of the 512 hidden units never fired on Breakout frames
    (92% at 60k steps, where V was flat across states and pi still uniform). With A2C's orthogonal
    init: 54% at 12k, 40% at 60k (seed 1). The threshold 75% lies between."""
    flags = "--total-timesteps 12000 --eval-frequency 12000 --eval-episodes 1 --max-episode-frames 2000 --save-model"
    proc = run_script("soft_a2c_atari.py", [*flags.split(), "--seed", "1"], workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (model,) = list(workdir.glob("runs/*/*.cleanrl_model"))
    agent = sa.Agent(4)
    agent.load_state_dict(torch.load(model, weights_only=False)["agent"])
    env = sa.make_env("breakout", 8, 0, False, False)
    rng, frames = np.random.default_rng(0), [env.reset(seed=0)[0]]
    for _ in range(100):
        frames.append(env.step(rng.integers(0, 4, 8))[0])
    with torch.no_grad():
        hidden = agent.torso(torch.as_tensor(np.concatenate(frames)).float() / 255.0)
    dead = (hidden.max(0).values <= 0).float().mean().item()
    assert dead < 0.75, f"{dead:.0%} of the hidden units never fire"


def test_episodic_life_ends_a_training_episode_at_a_life_loss_and_the_game_goes_on(workdir):
    """DeepMind's episodic life: each life lost is a termination, the game continues with one life
    fewer, and the logged return and length are the whole game's. (ale-py's own `episodic_life`
    restarts the game at every life lost: lives would read 5, 5, 5, ...)"""
    env = sa.make_env("breakout", 1, 0, False, True)
    env.reset(seed=0)
    rng, lives_after = np.random.default_rng(0), []
    while len(lives_after) < 5:
        _, _, terminated, _, info = env.step(rng.integers(0, 4, 1))
        if terminated[0]:
            lives_after.append(int(info["lives"][0]))
    assert lives_after == [4, 3, 2, 1, 5]  # same-step reset: the new game's 5 lives after the last one
    flags = (
        "--env-id BreakoutNoFrameskip-v4 --episodic-life --num-envs 4 --total-timesteps 4000 "
        "--eval-frequency 4000 --eval-episodes 1 --max-episode-frames 4000 --seed 1"
    )
    proc = run_script("soft_a2c_atari.py", flags.split(), workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lengths = [v for _, v in read_scalars(workdir)["charts/episodic_length"]]
    # a random Breakout game lasts about 150 agent steps, a single life about 30
    assert len(lengths) >= 8 and min(lengths) > 60 and np.mean(lengths) > 100, lengths


@pytest.mark.parametrize(
    "flags",
    [["--update", "pg", "--objective", "naive", "--save-model"], ["--update", "soft-q", "--regularizer", "entropy"]],
)
def test_end_to_end_breakout_with_4_envs(flags, workdir):
    common = (
        "--env-id BreakoutNoFrameskip-v4 --num-envs 4 --total-timesteps 3000 --log-frequency 20 "
        "--eval-frequency 3000 --eval-episodes 1 --max-episode-frames 4000 --seed 3"
    )
    proc = run_script("soft_a2c_atari.py", [*common.split(), *flags], workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(workdir)
    tags = [
        "charts/episodic_return",
        "charts/SPS",
        "charts/learning_rate",
        "losses/loss",
        "losses/entropy",
        "losses/kl_to_uniform",
        "losses/explained_variance",
        "eval/episodic_return",
    ]
    tags += ["losses/policy_loss", "losses/value_loss"] if "pg" in flags else ["losses/soft_q_loss"]
    for tag in tags:
        assert scalars.get(tag), f"{tag} was not logged"
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs[-1] < lrs[0]  # linear decay
    if "--save-model" in flags:
        (model,) = list(workdir.glob("runs/*/*.cleanrl_model"))
        returns = sa.evaluate(str(model), eval_episodes=1, seed=3 + 20_000, max_frames=4000)
        np.testing.assert_allclose(returns, [v for _, v in scalars["eval/reloaded_episodic_return"]])


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--env-id", "Pendulum-v1"], ["Pendulum-v1", "continuous control"]),
        (["--tau", "0"], ["--tau", "> 0"]),
        (["--tau", "-0.01"], ["--tau"]),
        (["--num-envs", "0"], ["--num-envs", "at least 1"]),
        (["--eval-frequency", "0"], ["--eval-frequency", ">= 1"]),
        (["--total-timesteps", "50"], ["--total-timesteps", "no update would run"]),
        (["--checkpoint-frequency", "-1"], ["--checkpoint-frequency", ">= 0"]),
        (["--resume", "nowhere.pt"], ["--resume nowhere.pt", "no such file"]),
        (["--eval-model", "nowhere.pt"], ["--eval-model nowhere.pt", "no such file"]),
    ],
)
def test_bad_input_stops_before_training(flags, names, tmp_path, monkeypatch):
    message = stops_with(sa, flags, tmp_path, monkeypatch)
    assert all(name in message for name in names), message
