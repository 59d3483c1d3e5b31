"""M-IQ: Munchausen-IQ, IQ with the Munchausen term alpha > 0, for continuous control.

Vieillard, Andrychowicz, Raichuk, Pietquin, Geist, "Implicitly Regularized RL with Implicit
Q-values", AISTATS 2022. Docs: docs/iq.md. This file is iq_continuous.py plus the Munchausen term.

IQ has no Q-network: Q is implicit in a policy pi_theta and a value V_phi, and one loss trains both
  implicit Q  Q(s, a) = tau ln pi_theta(a|s) + V_phi(s)                                   (Eq. 1)
  loss        E[(r + alpha clip(tau ln pi_theta_bar(a|s), l0, 0) + gamma (1 - term.) V_phi_bar(s')
                 - tau ln pi_theta(a|s) - V_phi(s))^2]                                (Eq. 2)
theta_bar, phi_bar are Polyak averages. By Theorem 1 an exact M-IQ step is a step of mirror-descent
VI, KL weight alpha tau, entropy weight (1 - alpha) tau; the clip is ours, from M-DQN. The policy
is multicategorical (Sec. 4): each action dimension takes n_bins values spanning its bounds (both
included, our choice), pi = prod_j softmax(F^j(s)); the buffer stores bin indices. The rest is
SAC's (256-256 MLPs, Adam 3e-4, batch 256).
Ablations (Fig. 2): --residual (Trust-PCL: the online V(s'), differentiated), --policy gaussian.

    python miq_continuous.py --env-id Hopper-v5
    python miq_continuous.py --env-id dm_control/cheetah-run-v0
"""

import os
import pickle
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    env_id: str = "Hopper-v5"  # gymnasium env, bounded Box actions; or dm_control/<dom>-<task>-v0
    total_timesteps: int = 1000000  # total timesteps of the experiment
    buffer_size: int = int(1e6)  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    lam: float = 0.005  # Polyak rate lambda of the target network(s) (CleanRL's `tau`)
    batch_size: int = 256  # the size of a batch sampled from the replay memory
    learning_starts: int = 5000  # the step to start learning; uniform random bins before
    learning_rate: float = 3e-4  # Adam's learning rate (one optimizer, one loss, both networks)
    tau: float = 0.01  # temperature tau of the implicit Q tau ln pi + V (the paper: 0.01, MuJoCo)
    n_bins: int = 11  # number of bins per action dimension of the multicategorical policy
    policy: Literal["multicategorical", "gaussian"] = "multicategorical"  # or the Gaussian ablation
    alpha: float = 0.9  # Munchausen coefficient in [0, 1] (0.9: the paper's best; 0 gives IQ)
    munchausen_clip: float | None = -1.0  # l0 of the clip to [l0, 0], M-DQN's (None: Eq. 2)
    residual: bool = False  # the ablation: online, differentiated V(s') in the target (Trust-PCL)

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 10000  # evaluate the deterministic policy every this many steps
    eval_episodes: int = 10  # the number of episodes of each deterministic evaluation
    log_frequency: int = 100  # log losses and SPS every this many steps
    save_model: bool = False  # save the model into runs/{run_name}, then reload and evaluate it
    checkpoint_frequency: int = 0  # checkpoint every this many steps; 0: on SIGTERM, Ctrl-C only
    resume: str | None = None
    """continue the run of this checkpoint (or run folder), in a new episode; only
    --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None  # checkpoint and exit at this step (a chunk of a longer run)
    eval_model: str | None = None  # evaluate this saved model or checkpoint, and exit
    capture_video: bool = False  # videos of the evaluation episodes into videos/ (needs moviepy)
    track: bool = False  # track the run with Weights and Biases (needs wandb)
    wandb_project_name: str = "entropy-rl"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project


def make_env(env_id: str, seed: int, capture_video=False, video_folder=None, every: int = 1):
    if env_id.startswith("dm_control/"):  # shimmy registers the dm_control/<domain>-<task>-v0 ids
        warnings.filterwarnings("ignore", module="glfw")  # no display: not needed to simulate
        import shimmy

        gym.register_envs(shimmy)
    try:
        env = gym.make(env_id, render_mode="rgb_array" if capture_video else None)
    except gym.error.Error as exc:  # NameNotFound, VersionNotFound, ...: a typo in --env-id
        raise SystemExit(f"error: --env-id {env_id}: {exc}; e.g. Hopper-v5") from None
    if capture_video:  # the first episode of every evaluation
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda i: i % every == 0)
    if isinstance(env.observation_space, gym.spaces.Dict):  # dm_control: a dict of arrays
        env = gym.wrappers.FlattenObservation(env)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def mlp(in_dim: int, out_dim: int, hidden: int = 256) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, out_dim))


class ValueNetwork(nn.Module):
    """V_phi(s): obs -> scalar (the architecture of SAC's critic, without the action input)."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


def make_bins(low, high, n_bins: int) -> torch.Tensor:
    """(m, n_bins) evenly spaced action values per dimension, both bounds included exactly."""
    low = torch.as_tensor(np.asarray(low, dtype=np.float64))
    high = torch.as_tensor(np.asarray(high, dtype=np.float64))
    frac = torch.linspace(0.0, 1.0, n_bins, dtype=torch.float64)
    bins = low[:, None] + (high - low)[:, None] * frac[None, :]
    bins[:, 0], bins[:, -1] = low, high
    return bins.float()


def multicategorical_log_prob(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ln pi(a|s) = sum_j log_softmax(F^j(s))[a^j] (Sec. 4): logits (B, m, n), idx (B, m) -> (B,)"""
    return torch.log_softmax(logits, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1)


class MulticategoricalPolicy(nn.Module):
    """pi_theta(a|s) = prod_j softmax(F^j(s)): one MLP torso, a last layer of n_bins*m logits.

    A "raw" action is the (m,) vector of bin indices; `to_env` maps it to the bin values."""

    def __init__(self, obs_dim: int, low, high, n_bins: int):
        super().__init__()
        self.m, self.n_bins = len(low), n_bins
        self.net = mlp(obs_dim, self.m * n_bins)
        self.register_buffer("bins", make_bins(low, high, n_bins))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).view(-1, self.m, self.n_bins)

    def log_prob(self, obs: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return multicategorical_log_prob(self.logits(obs), raw.long())

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Categorical(logits=self.logits(obs)).sample()

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits(obs).argmax(-1)

    def random(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.n_bins, (n, self.m), device=self.bins.device)

    def to_env(self, raw: torch.Tensor) -> torch.Tensor:
        return self.bins[torch.arange(self.m, device=raw.device), raw.long()]


class GaussianPolicy(nn.Module):
    """The Gaussian ablation: a tanh-squashed Gaussian (SAC's policy network and log-std range).

    A "raw" action is the pre-tanh sample u; ln pi is the density of the squashed action
    a = tanh(u)*scale + bias, so the implicit Q-value lives in action space as in Eq. (1)."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, low, high):
        super().__init__()
        self.m = len(low)
        self.net = mlp(obs_dim, 2 * self.m)
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (low, high))
        self.register_buffer("scale", (high - low) / 2.0)
        self.register_buffer("bias", (high + low) / 2.0)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = torch.tanh(log_std)
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (log_std + 1)
        return torch.distributions.Normal(mean, log_std.exp())

    def log_prob(self, obs: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        # ln(1 - tanh(u)^2) = 2*(ln 2 - u - softplus(-2u)), the stable form of the tanh Jacobian
        log_det = 2.0 * (np.log(2.0) - raw - F.softplus(-2.0 * raw)) + torch.log(self.scale)
        return self.dist(obs).log_prob(raw).sum(-1) - log_det.sum(-1)

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).sample()

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).mean

    def random(self, n: int) -> torch.Tensor:
        u = torch.rand(n, self.m, device=self.scale.device) * 2.0 - 1.0
        return torch.atanh(u.clamp(-0.999, 0.999))

    def to_env(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.tanh(raw) * self.scale + self.bias


def make_policy(kind: str, obs_dim: int, low, high, n_bins: int) -> nn.Module:
    if kind == "gaussian":
        return GaussianPolicy(obs_dim, low, high)
    return MulticategoricalPolicy(obs_dim, low, high, n_bins)


class ReplayBuffer:
    """Preallocated FIFO storage of (s, a, r, s', terminated) as CPU tensors."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.obs, self.next_obs = torch.zeros(capacity, obs_dim), torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, act_dim)
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity)  # 1 only for terminations, never for truncations

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        self.obs[self.pos], self.actions[self.pos] = torch.as_tensor(obs), torch.as_tensor(action)
        self.next_obs[self.pos] = torch.as_tensor(next_obs)
        self.rewards[self.pos], self.dones[self.pos] = float(reward), float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:  # the whole storage: a resumed run keeps the buffer's capacity
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)

    def sample(self, batch_size: int, device: torch.device):
        idx = torch.randint(0, self.size, (batch_size,))
        batch = (self.obs, self.actions, self.rewards, self.next_obs, self.dones)
        return tuple(x[idx].to(device, non_blocking=True) for x in batch)


def miq_target(rewards, dones, log_pi_target, v_next, gamma: float, tau: float, alpha: float, l0):
    """Eq. 2's target r + alpha clip(tau ln pi_bar(a|s), l0, 0) + gamma (1 - terminated) V(s'); a
    truncation still bootstraps. The clip is M-DQN's, not in the paper: unclipped, the bonus can
    swamp the reward (docs/iq.md); l0 None skips it."""
    munchausen = tau * log_pi_target
    if l0 is not None:
        munchausen = munchausen.clamp(l0, 0.0)
    return rewards + alpha * munchausen + gamma * (1.0 - dones) * v_next


def iq_loss(log_pi, v, target, tau: float):
    """Eq. 2: squared error between the implicit Q (Eq. 1) tau ln pi(a|s) + V(s) and the target."""
    return (target - (tau * log_pi + v)).pow(2).mean()


def polyak(target: nn.Module, online: nn.Module, lam: float) -> None:
    """theta_bar <- (1 - lam) theta_bar + lam theta."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.lerp_(p, lam)


def update(batch, learner: dict, args: Args) -> dict:
    """One gradient step of Eq. 2 on a sampled batch, then the Polyak averages theta_bar, phi_bar.
    Returns the loss and estimates to log, detached."""
    b_obs, b_raw, b_rewards, b_next_obs, b_dones = batch
    policy, value = learner["policy"], learner["value"]
    with torch.no_grad():
        log_pi_target = learner["policy_target"].log_prob(b_obs, b_raw)
        v_next = learner["value_target"](b_next_obs)
    if args.residual:  # Trust-PCL: online V(s'), differentiated
        v_next = value(b_next_obs)
    munchausen = (args.tau, args.alpha, args.munchausen_clip)
    y = miq_target(b_rewards, b_dones, log_pi_target, v_next, args.gamma, *munchausen)
    log_pi, v = policy.log_prob(b_obs, b_raw), value(b_obs)
    loss = iq_loss(log_pi, v, y, args.tau)
    learner["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    learner["optimizer"].step()
    polyak(learner["policy_target"], policy, args.lam)
    polyak(learner["value_target"], value, args.lam)
    return dict(loss=loss.detach(), log_pi=log_pi.detach(), v=v.detach(), y=y.detach())


def train(args: Args) -> None:
    args, run = start_run(args)  # --eval-model; resume, checks, envs, name, writer, seeds: appendix
    env, device = run.env, run.device
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    policy = make_policy(args.policy, obs_dim, low, high, args.n_bins).to(device)
    value = ValueNetwork(obs_dim).to(device)
    policy_target = make_policy(args.policy, obs_dim, low, high, args.n_bins).to(device)
    value_target = ValueNetwork(obs_dim).to(device)
    value_target.load_state_dict(value.state_dict())
    policy_target.load_state_dict(policy.state_dict())
    # one loss, one optimizer; fused Adam: one kernel for all parameters
    online_params = list(policy.parameters()) + list(value.parameters())
    optimizer = torch.optim.Adam(online_params, lr=args.learning_rate, fused=True)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    learner = dict(policy=policy, value=value, value_target=value_target, optimizer=optimizer)
    learner.update(policy_target=policy_target, rb=rb)
    env, obs = run.restore(learner)  # a checkpoint's learner, buffer and episode, or a new episode
    for global_step in range(run.start_step, args.total_timesteps):
        run.stop_if_asked(global_step, learner, obs)  # SIGTERM, Ctrl-C, --stop-at: checkpoint, exit
        if global_step < args.learning_starts:  # uniform random bins during the warm-up
            raw = policy.random(1)
        else:
            with torch.no_grad():
                raw = policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
        action = policy.to_env(raw)[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, raw[0].cpu(), reward, next_obs, terminated)  # the bins' indices as the action
        obs = next_obs
        if terminated or truncated:
            run.log_episode(info, global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:  # one gradient step of Eq. 2 per env step
            logs = update(rb.sample(args.batch_size, device), learner, args)
            log_update(run, logs, args, rb, global_step)  # every step: stops a diverging run

        if run.evaluation_due(global_step + 1):  # the mode; implicit Q against the returns
            run.evaluate(global_step, policy, value, args.tau, args.gamma)
        run.step_done(global_step + 1, learner, obs)  # periodic checkpoint, progress line
    run.finish({"policy": policy.state_dict(), "value": value.state_dict()})


# ---------------------------------------------------------------------------------------------
# Appendix: input checks, evaluation, logging and checkpoints
# ---------------------------------------------------------------------------------------------
def check_args(args: Args, checkpoint: dict | None = None) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    step = checkpoint["global_step"] if checkpoint else 0
    for ok, msg in [
        (0 < args.gamma < 1, f"--gamma must be in (0, 1) (got {args.gamma}); 0.99 is usual"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1 (got {args.eval_episodes})"),
        (args.seed >= 0, f"--seed must be >= 0 (got {args.seed}): NumPy takes seeds in [0, 2**32)"),
        (args.learning_rate > 0, "--learning-rate must be > 0"),
        (not args.track or find_spec("wandb"), "--track needs wandb: pip install wandb"),
        (args.buffer_size >= args.batch_size,
         f"--buffer-size {args.buffer_size} < --batch-size {args.batch_size}: raise --buffer-size"),
        (not args.env_id.startswith("ALE/") and "NoFrameskip" not in args.env_id,
         f"--env-id {args.env_id} is an Atari game: use soft_dqn_atari.py or soft_a2c_atari.py"),
        (args.total_timesteps >= 1, f"--total-timesteps must be >= 1 (got {args.total_timesteps})"),
        (step < args.total_timesteps,
         f"the run in {args.resume} is complete ({step} steps); extend it with --total-timesteps"),
        (args.learning_starts < args.total_timesteps,
         f"--learning-starts {args.learning_starts} >= --total-timesteps: no gradient step"),
        (args.eval_frequency >= 1, f"--eval-frequency must be >= 1 (got {args.eval_frequency})"),
        (args.tau > 0, f"--tau must be > 0 (got {args.tau}); the paper uses 0.01 on MuJoCo"),
        (args.n_bins >= 2, f"--n-bins must be at least 2 (got {args.n_bins}); the paper uses 11"),
        (0 <= args.alpha <= 1, f"--alpha must be in [0, 1] (got {args.alpha}); the paper uses 0.9"),
        (args.munchausen_clip is None or args.munchausen_clip < 0,
         f"--munchausen-clip must be < 0 (got {args.munchausen_clip}); M-DQN uses -1"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
        (min(args.batch_size, args.buffer_size) >= 1,
         "--batch-size and --buffer-size must be positive"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")
    if args.capture_video:
        check_video_prerequisites(args.env_id)


def check_action_space(env_id: str, space: gym.Space) -> None:
    """The policy needs a 1-D Box action space with finite bounds."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        sys.exit(f"error: {env_id} has action space {space}; this script needs a continuous Box "
                 "(discrete actions: Atari only, soft_dqn_atari.py or soft_a2c_atari.py)")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        sys.exit(f"error: {env_id} has unbounded actions; wrap it in gymnasium.wrappers.ClipAction")


def start_run(args: Args) -> tuple[Args, "Run"]:
    """The run's set-up before any network: --eval-model evaluates and exits here; else the flags
    of a checkpoint with --resume, the checks, the env and a Run (name, writer, seeds...)."""
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", args.capture_video)
        print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    env = make_env(args.env_id, args.seed)
    check_action_space(args.env_id, env.action_space)
    run = Run(args, checkpoint, env)
    bins = f" ({args.n_bins} bins)" if args.policy == "multicategorical" else ""
    # printed by Run.restore, just before the loop
    run.banner = (
        f"{SCRIPT}: {args.env_id}, {args.policy} policy{bins}, temperature --tau {args.tau} "
        f"(CleanRL's Polyak tau is --lam), Munchausen alpha {args.alpha} (not SAC's alpha), clip "
        f"{args.munchausen_clip}, {run.device}, runs/{run.name}"
    )
    return args, run


def log_update(run: "Run", logs: dict, args: Args, rb: ReplayBuffer, step: int) -> None:
    """Stop a run whose loss is not finite; every --log-frequency steps, stop one whose values run
    away, and log the last update's loss and estimates."""
    if not torch.isfinite(logs["loss"]):
        sys.exit(f"error: the loss is not finite at step {step}; try a larger --tau")
    if step % args.log_frequency != 0:
        return
    # the largest tau H(pi) of a step, plus the largest clipped Munchausen term
    bonus = args.tau * rb.actions.shape[1] * np.log(args.n_bins)
    bonus += args.alpha * abs(args.munchausen_clip or 0.0)
    check_values(logs["v"], rb.rewards[: rb.size], args.gamma, bonus, step)
    tau_log_pi, v = args.tau * logs["log_pi"], logs["v"]
    implicit_q = (tau_log_pi + v).mean().item()  # Eq. 1
    run.log(dict(iq_loss=logs["loss"].item(), v_values=v.mean().item(),
                 tau_log_pi=tau_log_pi.mean().item(), implicit_q_values=implicit_q,
                 target_values=logs["y"].mean().item()), step)  # fmt: skip


def check_values(values, rewards, gamma: float, bonus: float, step: int) -> None:
    """Stop a run whose values run away with finite losses: mean |values| over ten times
    (max |r| + bonus)/(1 - gamma), the largest discounted return; bonus: a step's entropy term."""
    bound = (rewards.abs().max().item() + bonus) / max(1.0 - gamma, 1e-8)
    if 0 < 10 * bound < (mean := values.abs().mean().item()):
        sys.exit(f"error: the values diverged at step {step} (mean |V| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a larger --tau or a smaller --learning-rate")


@torch.no_grad()
def evaluate_policy(policy, env, n_episodes, device, seed, value=None, tau=0.01, gamma=0.99):
    """Deterministic evaluation (the policy's mode): the returns of `n_episodes` episodes, and over
    every visited state the mean implicit Q tau ln pi(a|s) + V(s) (Eq. 1) against the mean
    discounted return obtained from s (to the episode's end: short of the true value near a
    truncation); nan without `value`."""
    returns, q_estimates, discounted, rewards = [], [], [], []
    obs, _ = env.reset(seed=seed)
    while len(returns) < n_episodes:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        raw = policy.mode(obs_t)
        if value is not None:
            q_estimates.append((tau * policy.log_prob(obs_t, raw) + value(obs_t)).item())
        obs, reward, terminated, truncated, info = env.step(policy.to_env(raw)[0].cpu().numpy())
        rewards.append(float(reward))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            g, start = 0.0, len(discounted)
            for r in reversed(rewards):  # the discounted return from each step to the episode's end
                g = r + gamma * g
                discounted.insert(start, g)
            rewards = []
            obs, _ = env.reset()
    mean = lambda x: float(np.mean(x)) if value is not None else float("nan")  # noqa: E731
    return np.array(returns), mean(q_estimates), mean(discounted)


def evaluate(path: str, eval_episodes=10, seed=0, device="cpu", capture_video=False) -> np.ndarray:
    """Deterministic evaluation returns of a saved model or checkpoint, on the env it names."""
    saved = load_checkpoint(path, "--eval-model")
    env_id, kind, n_bins = (saved["args"][k] for k in ("env_id", "policy", "n_bins"))
    if capture_video:
        check_video_prerequisites(env_id)
    env = make_env(env_id, seed, capture_video, "videos/eval", eval_episodes)
    space = env.action_space
    policy = make_policy(kind, env.observation_space.shape[0], space.low, space.high, n_bins)
    policy.load_state_dict(saved["policy"])
    return evaluate_policy(policy.to(device), env, eval_episodes, torch.device(device), seed)[0]


def check_video_prerequisites(env_id: str) -> None:
    """--capture-video needs moviepy and a renderer (MUJOCO_GL=egl or osmesa without a display)."""
    try:
        import moviepy  # noqa: F401

        make_env(env_id, 0).close()  # registers dm_control ids
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except ImportError as exc:
        sys.exit(f"error: --capture-video needs {exc.name}: pip install {exc.name}")
    except Exception as exc:  # pygame missing, or no OpenGL context (mujoco.FatalError)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.exit(f"error: --capture-video could not render {env_id} ({msg}); try MUJOCO_GL=egl")


class Run:
    """The run-keeping half of train(): the run's name, envs, stop signals, writer and seeds, then
    its checkpoints, logs of episodes and evaluations, the progress line and the saved model."""

    def __init__(self, args: Args, checkpoint: dict | None, env: gym.Env):
        name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.args, self.checkpoint, self.env = args, checkpoint, env
        self.name = checkpoint["run_name"] if checkpoint else name
        self.path, self.eval_seed = f"runs/{self.name}/checkpoint.pt", args.seed + 10_000
        self.eval_env = make_env(args.env_id, self.eval_seed, args.capture_video,
                                 f"videos/{self.name}", args.eval_episodes)
        self.signals = []  # SIGTERM (a job's time limit) or Ctrl-C: checkpoint, then exit
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda sig, frame: self.signals.append(sig))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                       sync_tensorboard=True, name=self.name, save_code=True)  # fmt: skip
        # a resumed run logs into its folder, hiding what the stopped run logged from its step on
        purge_step = checkpoint["global_step"] if checkpoint else None
        self.writer = SummaryWriter(f"runs/{self.name}", purge_step=purge_step)
        if not checkpoint:
            table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.start_step, self.last_return = 0, None

    def restore(self, learner: dict):
        """Load a checkpoint's learner (networks, optimizers, buffer) and random states; the env and
        observation to go on from: the checkpoint's episode where its env was saved whole (classic
        control, DeepMind Control: the run goes on as if never stopped), else a new episode."""
        print(self.banner)
        if ckpt := self.checkpoint:
            for key, x in learner.items():
                if torch.is_tensor(x):  # a learned scalar, as SAC's log alpha
                    x.data.copy_(ckpt[key])
                else:  # networks, optimizers, the buffer
                    x.load_state_dict(ckpt[key])
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.start_step = ckpt["global_step"]
            total = self.args.total_timesteps
            print(f"resumed {self.args.resume} at step {self.start_step} of {total}")
        if self.checkpoint and self.checkpoint.get("episode"):
            self.env.close()
            self.env, obs = pickle.loads(ckpt["episode"]["env"]), ckpt["episode"]["obs"]
        else:
            obs = self.env.reset(seed=self.args.seed + self.start_step)[0]
        self.progress = Progress(self.args.total_timesteps, self.start_step)
        self.start_time = time.time()
        return self.env, obs

    def save(self, step: int, learner: dict, obs) -> None:
        """The learner before step `step`, random states and the episode in progress where the env
        pickles whole (MuJoCo's and Atari's pickle as their constructor's arguments only); written
        to a temporary file, then renamed: a kill mid-write leaves the last checkpoint whole."""
        rng = dict(python=random.getstate(), numpy=np.random.get_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        rng.update(torch=torch.get_rng_state(), cuda=cuda)
        state = {k: x.cpu() if torch.is_tensor(x) else x.state_dict() for k, x in learner.items()}
        whole = not isinstance(self.env.unwrapped, gym.utils.EzPickle)
        episode = dict(env=pickle.dumps(self.env), obs=obs) if whole else None
        meta = dict(script=SCRIPT, args=vars(self.args), run_name=self.name, global_step=step)
        torch.save({**meta, "rng": rng, "episode": episode, **state}, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def stop_if_asked(self, step: int, learner: dict, obs) -> None:
        if self.signals or step == self.args.stop_at:  # checkpoint as before `step`, and exit
            self.save(step, learner, obs)
            why = f"signal {self.signals[0]}" if self.signals else "--stop-at"
            self.progress.print(f"stopped by {why} at step {step}; --resume {self.path}")
            sys.exit(128 + self.signals[0] if self.signals else 0)

    def log_episode(self, info: dict, step: int) -> None:
        self.last_return = info["episode"]["r"]
        self.writer.add_scalar("charts/episodic_return", self.last_return, step)
        self.writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), step)

    def log(self, scalars: dict, step: int) -> None:  # an update's losses and estimates, and SPS
        for tag, value in scalars.items():
            self.writer.add_scalar(f"losses/{tag}", value, step)
        self.writer.add_scalar("charts/SPS", self.sps(step), step)

    def sps(self, steps: int) -> int:
        return int((steps - self.start_step) / (time.time() - self.start_time))

    def evaluation_due(self, steps: int) -> bool:
        return steps % self.args.eval_frequency == 0 or steps == self.args.total_timesteps

    def evaluate(self, step: int, policy, *critics) -> None:
        """Evaluate the policy (see evaluate_policy), log the mean return, and the value estimate
        of the visited states against the discounted return obtained: over-estimation shows."""
        returns, q_estimate, discounted_return = evaluate_policy(
            policy, self.eval_env, self.args.eval_episodes, self.device, self.eval_seed, *critics)
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.writer.add_scalar("eval/q_estimate", q_estimate, step)
        self.writer.add_scalar("eval/discounted_return", discounted_return, step)
        self.progress.print(f"step {step + 1}: eval return {returns.mean():.1f}, Q estimate "
                            f"{q_estimate:.1f} vs discounted return {discounted_return:.1f}, "
                            f"SPS {self.sps(step + 1)}")

    def step_done(self, steps: int, learner: dict, obs) -> None:
        every, end = self.args.checkpoint_frequency, steps == self.args.total_timesteps
        if every and (steps % every == 0 or end):
            self.save(steps, learner, obs)
        self.progress.update(steps, self.last_return)

    def finish(self, state_dicts: dict) -> None:
        """End the progress line; with --save-model, save the networks, reload and evaluate them."""
        self.progress.print()
        if (args := self.args).save_model:
            path = f"runs/{self.name}/{args.exp_name}.cleanrl_model"
            torch.save({"script": SCRIPT, "args": vars(args), **state_dicts}, path)
            returns = evaluate(path, args.eval_episodes, args.seed + 20_000, str(self.device))
            for idx, episodic_return in enumerate(returns):
                self.writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
            print(f"model saved to {path}; reloaded: eval return {returns.mean():.1f}")
        for resource in (self.env, self.eval_env, self.writer):
            resource.close()


class Progress:
    """Steps done of the total, steps per second, time left and the last return on one line: redrawn
    4 times a second on a terminal, a line every 30 s in a file or pipe; `print` writes above it."""

    def __init__(self, total: int, start: int):
        self.total, self.step, self.shown, self.rate = total, start, time.time(), None
        self.tty = sys.stdout.isatty()

    def update(self, step: int, last_return) -> None:
        if (now := time.time()) - self.shown < (0.25 if self.tty else 30.0):
            return
        rate = (step - self.step) / (now - self.shown)  # since the last line, smoothed below
        self.rate = rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
        self.step, self.shown, left = step, now, int((self.total - step) / rate) if rate > 0 else 0
        last = "-" if last_return is None else f"{float(last_return):.1f}"
        self.print(f"{step}/{self.total} steps, {rate:.0f}/s, {left // 3600}:{left // 60 % 60:02d}:"
                   f"{left % 60:02d} left, last return {last}", end="" if self.tty else "\n")

    def print(self, message: str | None = None, end: str = "\n") -> None:
        if message is not None or self.tty:  # none: end the progress line on a terminal
            text = f"\r\033[K{message}" if self.tty and message else message or ""
            print(text, end=end, flush=True)


RESUME_FLAGS = ("total_timesteps", "checkpoint_frequency", "stop_at", "cuda", "track")


def load_checkpoint(path: str, flag: str) -> dict:
    """A checkpoint or saved model written by this script (our own file: trusted, unpickled)."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path  # a run folder
    if not os.path.isfile(path):
        sys.exit(f"error: {flag} {path}: no such file (checkpoints are runs/<run>/checkpoint.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        script = saved["script"]
    except Exception:
        sys.exit(f"error: {flag} {path} is not a checkpoint or saved model of {SCRIPT}")
    if script != SCRIPT:
        sys.exit(f"error: {flag} {path} was written by {script}: use {script} with it")
    return saved


def resume_args(args: Args, checkpoint: dict) -> Args:
    """The checkpointed run's flags, with those of RESUME_FLAGS given on this command line."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
    given = {n.removeprefix("no_") if n[3:] in RESUME_FLAGS else n for n in names} - {"resume"}
    if refused := sorted(given - set(RESUME_FLAGS)):
        flag, allowed = refused[0].replace("_", "-"), ", --".join(RESUME_FLAGS).replace("_", "-")
        sys.exit(f"error: --{flag} cannot change on --resume; only --{allowed} may be given")
    merged = {k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__}
    # --resume and --stop-at come from this command line only: a chunk's stop is not the next one's
    merged.update({k: getattr(args, k) for k in ("resume", "stop_at", *given)})
    return Args(**merged)


if __name__ == "__main__":
    train(tyro.cli(Args))
