"""IQ: Implicitly Regularized RL with Implicit Q-values, for continuous control.

Vieillard, Andrychowicz, Raichuk, Pietquin, Geist, "Implicitly Regularized RL with Implicit
Q-values", AISTATS 2022. Docs: docs/iq.md. miq_continuous.py is this file plus the Munchausen term.

IQ has no Q-network: Q is implicit in a policy pi_theta and a value V_phi, and one loss trains both
  implicit Q  Q(s, a) = tau ln pi_theta(a|s) + V_phi(s)                                   (Eq. 1)
  loss        E[(r + gamma (1 - terminated) V_phi_bar(s') - tau ln pi_theta(a|s) - V_phi(s))^2]
                                                                          (Eq. 2, alpha = 0)
phi_bar is the Polyak average of phi. By Theorem 1 an exact IQ step is a step of soft value
iteration with entropy weight tau. The policy is multicategorical (Sec. 4): each action dimension
takes n_bins values spanning its bounds (both included, our choice), pi = prod_j softmax(F^j(s));
the buffer stores bin indices. The rest is SAC's (256-256 MLPs, Adam 3e-4, batch 256).
Ablations (Fig. 2): --residual (PCL: the online V(s'), differentiated), --policy gaussian.

    python iq_continuous.py --env-id Hopper-v5
    python iq_continuous.py --env-id dm_control/cheetah-run-v0
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
    env_id: str = "Hopper-v5"
    """a gymnasium env with a bounded Box action space, or dm_control/<domain>-<task>-v0"""
    total_timesteps: int = 1000000  # total timesteps of the experiment
    buffer_size: int = int(1e6)  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    lam: float = 0.005  # Polyak rate lambda of the target network(s) (CleanRL's `tau`)
    batch_size: int = 256  # the size of a batch sampled from the replay memory
    learning_starts: int = 5000
    """timestep to start learning; before it, actions are uniform random bins"""
    learning_rate: float = 3e-4
    """the learning rate of the Adam optimizer (one optimizer, one loss, both networks)"""
    tau: float = 0.01
    """the temperature tau of the implicit Q-value tau ln pi + V (the paper: 0.01 on MuJoCo)"""
    n_bins: int = 11  # number of bins per action dimension of the multicategorical policy
    policy: Literal["multicategorical", "gaussian"] = "multicategorical"
    """the policy class; `gaussian` is the paper's Gaussian-policy ablation"""
    residual: bool = False
    """the residual ablation: online, differentiated V(s') in the target (PCL)"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 10000
    """evaluate the policy's most likely action every this many environment steps"""
    eval_episodes: int = 10  # the number of episodes of each deterministic evaluation
    log_frequency: int = 100  # log losses and SPS every this many steps
    save_model: bool = False
    """whether to save the model into the `runs/{run_name}` folder, then reload and evaluate it"""
    checkpoint_frequency: int = 0
    """checkpoint learner and replay buffer every this many steps; 0: only on SIGTERM or Ctrl-C"""
    resume: str | None = None
    """continue the run of this checkpoint (or run folder), in a new episode; only
    --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None
    """checkpoint and exit at this step: one chunk of a longer run, continued with --resume"""
    eval_model: str | None = None
    """evaluate this saved model or checkpoint for --eval-episodes episodes, and exit"""
    capture_video: bool = False
    """whether to capture videos of the evaluation episodes (into `videos/`; needs moviepy)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs wandb)"""
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
    """Preallocated FIFO storage of (s, raw action, r, s', terminated) as CPU tensors."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, act_dim)  # bin indices are exact in float32
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity)  # 1 only for terminations, never for truncations

    def add(self, obs, raw_action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs)
        self.next_obs[i] = torch.as_tensor(next_obs)
        self.actions[i] = raw_action
        self.rewards[i] = float(reward)
        self.dones[i] = float(terminated)
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


def iq_target(rewards, dones, v_next, gamma: float):
    """Eq. 2's target with alpha = 0: r + gamma (1 - terminated) V(s'); a truncation still
    bootstraps. V(s') is the target network (IQ) or the online one, differentiated (PCL)."""
    return rewards + gamma * (1.0 - dones) * v_next


def iq_loss(log_pi, v, target, tau: float):
    """Eq. 2: squared error between the implicit Q (Eq. 1) tau ln pi(a|s) + V(s) and the target."""
    return (target - (tau * log_pi + v)).pow(2).mean()


def polyak(target: nn.Module, online: nn.Module, lam: float) -> None:
    """x_bar <- (1 - lam) x_bar + lam x."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.lerp_(p, lam)


def train(args: Args) -> None:
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", args.capture_video)
        return print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    env = make_env(args.env_id, args.seed)
    check_action_space(args.env_id, env.action_space)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = checkpoint["run_name"] if checkpoint else run_name
    eval_seed, videos = args.seed + 10_000, f"videos/{run_name}"
    eval_env = make_env(args.env_id, eval_seed, args.capture_video, videos, args.eval_episodes)
    stop_signals = []  # SIGTERM (a job's time limit) or Ctrl-C: checkpoint, then exit
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, frame: stop_signals.append(sig))
    writer = make_writer(args, run_name, checkpoint["global_step"] if checkpoint else None)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    entropy_bonus = args.tau * act_dim * np.log(args.n_bins)  # the largest tau H(pi) of a step
    policy = make_policy(args.policy, obs_dim, low, high, args.n_bins).to(device)
    value = ValueNetwork(obs_dim).to(device)
    value_target = ValueNetwork(obs_dim).to(device)
    value_target.load_state_dict(value.state_dict())
    # one loss, one optimizer; fused Adam: one kernel for all parameters (about 3x faster on a CPU)
    online_params = list(policy.parameters()) + list(value.parameters())
    optimizer = torch.optim.Adam(online_params, lr=args.learning_rate, fused=True)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    learner = dict(policy=policy, value=value, value_target=value_target, optimizer=optimizer)
    learner["rb"] = rb
    start_step = restore(checkpoint, learner) if checkpoint else 0
    env, obs = resume_episode(checkpoint, env, args.seed + start_step)
    bins = f" ({args.n_bins} bins)" if args.policy == "multicategorical" else ""
    print(f"{SCRIPT}: {args.env_id}, {args.policy} policy{bins}, temperature --tau {args.tau} "
          f"(CleanRL's Polyak tau is --lam), {device}, runs/{run_name}")  # fmt: skip
    if checkpoint:
        print(f"resumed {args.resume} at step {start_step} of {args.total_timesteps}")
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    start_time = time.time()
    progress, last_return = Progress(args.total_timesteps, start_step), None
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or global_step == args.stop_at:
            save_checkpoint(checkpoint_path, global_step, args, run_name, learner, (env, obs))
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            progress.print(f"stopped by {why} at step {global_step}; --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if global_step < args.learning_starts:  # uniform random bins during the warm-up
            raw = policy.random(1)
        else:
            with torch.no_grad():
                raw = policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
        action = policy.to_env(raw)[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, raw[0].cpu(), reward, next_obs, terminated)
        obs = next_obs
        if terminated or truncated:
            last_return = info["episode"]["r"]
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:  # one gradient step of Eq. 2 per env step
            b_obs, b_raw, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size, device)
            with torch.no_grad():
                v_next = value_target(b_next_obs)
            if args.residual:  # PCL: online V(s'), differentiated
                v_next = value(b_next_obs)
            y = iq_target(b_rewards, b_dones, v_next, args.gamma)
            log_pi, v = policy.log_prob(b_obs, b_raw), value(b_obs)
            loss = iq_loss(log_pi, v, y, args.tau)
            if not torch.isfinite(loss):
                sys.exit(f"error: the loss is not finite at step {global_step}; try a larger --tau")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            polyak(value_target, value, args.lam)

            if global_step % args.log_frequency == 0:
                check_values(v, rb.rewards[: rb.size], args.gamma, entropy_bonus, global_step)
                with torch.no_grad():
                    tau_log_pi = args.tau * log_pi
                writer.add_scalar("losses/iq_loss", loss.item(), global_step)
                writer.add_scalar("losses/v_values", v.mean().item(), global_step)
                writer.add_scalar("losses/tau_log_pi", tau_log_pi.mean().item(), global_step)
                implicit_q = (tau_log_pi + v).mean().item()
                writer.add_scalar("losses/implicit_q_values", implicit_q, global_step)
                writer.add_scalar("losses/target_values", y.mean().item(), global_step)
                sps = int((global_step - start_step) / (time.time() - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)

        steps_done = global_step + 1
        if steps_done % args.eval_frequency == 0 or steps_done == args.total_timesteps:
            returns, q_estimate, discounted_return = evaluate_policy(
                policy, eval_env, args.eval_episodes, device, eval_seed, value, args.tau, args.gamma
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            # over-estimation shows as the implicit Q of visited states above what they returned
            writer.add_scalar("eval/q_estimate", q_estimate, global_step)
            writer.add_scalar("eval/discounted_return", discounted_return, global_step)
            sps = int((steps_done - start_step) / (time.time() - start_time))
            progress.print(f"step {steps_done}: eval return {returns.mean():.1f}, Q estimate "
                f"{q_estimate:.1f} vs discounted return {discounted_return:.1f}, SPS {sps}")
        end = steps_done == args.total_timesteps
        if args.checkpoint_frequency and (steps_done % args.checkpoint_frequency == 0 or end):
            save_checkpoint(checkpoint_path, steps_done, args, run_name, learner, (env, obs))
        progress.update(steps_done, last_return)
    progress.print()

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        weights = {"policy": policy.state_dict(), "value": value.state_dict()}
        torch.save({"script": SCRIPT, "args": vars(args), **weights}, model_path)
        returns = evaluate(model_path, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"model saved to {model_path}; reloaded: eval return {returns.mean():.1f}")
    env.close()
    eval_env.close()
    writer.close()


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
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
        (min(args.batch_size, args.buffer_size) >= 1,
         "--batch-size and --buffer-size must be positive"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")
    if args.capture_video:
        check_video_prerequisites(args.env_id)


def check_action_space(env_id: str, space: gym.Space) -> None:
    """IQ's policies need a 1-D Box action space with finite bounds."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        sys.exit(f"error: {env_id} has action space {space}; this script needs a continuous Box "
                 "(discrete actions: Atari only, soft_dqn_atari.py or soft_a2c_atari.py)")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        sys.exit(f"error: {env_id} has unbounded actions; wrap it in gymnasium.wrappers.ClipAction")


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


def make_writer(args: Args, run_name: str, purge_step: int | None):
    """TensorBoard under runs/{run_name}, and wandb with --track. A resumed run (purge_step given)
    logs into its own folder and hides what the stopped run logged from purge_step on."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step)
    if purge_step is None:
        table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


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


def save_checkpoint(path: str, step: int, args: Args, run_name: str, learner: dict, episode):
    """The learner before step `step`, its buffer, random states and episode; written to a temporary
    file, then renamed, so that a kill mid-write leaves the previous checkpoint whole."""
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = {k: x.state_dict() for k, x in learner.items()}
    meta = dict(script=SCRIPT, args=vars(args), run_name=run_name, global_step=step, rng=rng)
    env, obs = episode  # the episode in progress, where the env pickles whole (see resume_episode)
    whole = not isinstance(env.unwrapped, gym.utils.EzPickle)
    meta["episode"] = dict(env=pickle.dumps(env), obs=obs) if whole else None
    torch.save({**meta, **state}, path + ".tmp")
    os.replace(path + ".tmp", path)


def restore(checkpoint: dict, learner: dict) -> int:
    """Load the learner, its replay buffer and random states; the step to continue from."""
    for key, x in learner.items():  # networks, optimizer and the buffer
        x.load_state_dict(checkpoint[key])
    random.setstate(checkpoint["rng"]["python"])
    np.random.set_state(checkpoint["rng"]["numpy"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["global_step"]


def resume_episode(checkpoint: dict | None, env, seed: int):
    """The env and observation to go on from: the checkpoint's episode in progress where its env was
    saved whole (classic control, DeepMind Control), so a resumed run continues as if never stopped;
    else a new episode (MuJoCo's and Atari's envs pickle as their constructor's arguments only)."""
    if checkpoint and checkpoint.get("episode"):
        env.close()
        return pickle.loads(checkpoint["episode"]["env"]), checkpoint["episode"]["obs"]
    return env, env.reset(seed=seed)[0]


if __name__ == "__main__":
    train(tyro.cli(Args))
