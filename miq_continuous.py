"""M-IQ: Munchausen-IQ, IQ with the Munchausen term alpha > 0, for continuous control (single file).

Paper: Vieillard, Andrychowicz, Raichuk, Pietquin, Geist, "Implicitly Regularized RL with
Implicit Q-values", AISTATS 2022. Docs: docs/iq.md (the equations, the choices, the metrics).

IQ has no Q-network. The Q-value is implicit in a policy network pi_theta and a value network
V_phi (Eq. 1):

    Q(s, a) = tau * ln pi_theta(a|s) + V_phi(s)

and one regression loss trains both networks (Eq. 2; the (1 - done) mask is left implicit in
the paper):

    L(theta, phi) = E[(r + alpha*clip(tau*ln pi_theta_bar(a|s), l0, 0) + gamma*(1 - done)*V_phi_bar(s')
                       - tau*ln pi_theta(a|s) - V_phi(s))^2]

theta_bar and phi_bar are Polyak copies. This file is iq_continuous.py plus the Munchausen term
alpha*tau*ln pi_theta_bar(a|s), alpha = 0.9 (the paper's best): the target policy's own
log-probability added to the reward regularises implicitly with a KL to the previous policy
(Section 3). By Theorem 1 one exact M-IQ step is a step of Mirror-Descent VI with KL weight
alpha*tau and entropy weight (1 - alpha)*tau, pi_{k+2} proportional to
pi_{k+1}^alpha * exp((r + gamma*P V_k)/tau).

The clip (ours, from Munchausen-DQN, which IQ extends; the paper does not say whether IQ clips):
tau*ln pi_bar is clipped to [l0, 0] with l0 = -1. Iterating Eq. (2) exactly drives tau*ln pi to
A/(1 - alpha), ten times the soft advantage at alpha = 0.9, and with tau = 0.01 ln pi of replay
actions reached -5300 on Hopper-v5 unclipped, so the bonus swamped the reward.
`--munchausen-clip None` gives Eq. (2) as printed.

Policy (Section 4): multicategorical. Each of the m action dimensions is discretised into
n_bins evenly spaced values spanning the env's bounds, both ends included, and
pi(a|s) = prod_j softmax(F^j(s))[a^j], so ln pi = sum_j log_softmax(F^j(s))[a^j]. We follow
Section 4 (softmax(F)); the analysis of Section 3.3 writes softmax(F/tau), which only rescales
the logits. The replay buffer stores bin indices (the loss needs ln pi of the action taken) and
the env receives the bin values.

Everything else is SAC's (the paper keeps SAC's settings): 256-256 ReLU MLPs, Adam 3e-4,
batch 256, replay 1M, one gradient step per env step, Polyak rate lambda = 0.005 on both target
networks, tau = 0.01 on MuJoCo.

Ablations (paper, Fig. 2), as flags:
  --residual         Trust-PCL: the online V_phi(s') replaces V_phi_bar(s') and is differentiated
                     (the paper uses tau = 1e-4 there).
  --policy gaussian  a tanh-squashed Gaussian policy instead of the multicategorical one.

Choices of ours (not in the paper): bins include both bounds; the warm-up samples uniform
random bins; evaluation acts with the most likely bin per dimension (the Gaussian's mean);
one environment, not a vector env, so the true final observation of a truncated episode is at
hand: terminations stop bootstrapping, time-limit truncations bootstrap from that observation.

Usage:
    python miq_continuous.py --env-id Hopper-v5
    python miq_continuous.py --env-id Pendulum-v1 --total-timesteps 20000 --learning-starts 1000
"""

import os
import pickle
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "entropy-rl"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the evaluation episodes (into the `videos` folder; needs moviepy)"""
    save_model: bool = False
    """whether to save the model into the `runs/{run_name}` folder, then reload and evaluate it"""

    # Algorithm specific arguments
    env_id: str = "Hopper-v5"
    """the id of the environment (any gymnasium env with a bounded Box action space)"""
    total_timesteps: int = 1000000
    """total timesteps of the experiment"""
    buffer_size: int = int(1e6)
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    lam: float = 0.005
    """Polyak rate lambda of the target network(s): x_bar <- (1 - lambda) x_bar + lambda x (CleanRL's `tau`)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int = 5000
    """timestep to start learning; before it, actions are uniform random bins"""
    learning_rate: float = 3e-4
    """the learning rate of the Adam optimizer (one optimizer, one loss, both networks)"""
    tau: float = 0.01
    """the temperature tau of the implicit Q-value tau*ln pi + V (paper: 0.01 MuJoCo, 0.001 Adroit)"""
    alpha: float = 0.9
    """the Munchausen coefficient alpha in [0, 1] (0.9: the paper's best; 0 gives back IQ)"""
    munchausen_clip: float | None = -1.0
    """clip tau*ln pi_bar in the Munchausen term to [l0, 0], M-DQN's l0 = -1 (`None`: no clip, Eq. 2 as printed)"""
    n_bins: int = 11
    """number of bins per action dimension of the multicategorical policy"""
    policy: Literal["multicategorical", "gaussian"] = "multicategorical"
    """the policy class; `gaussian` is the paper's Gaussian-policy ablation"""
    residual: bool = False
    """the residual ablation: online, differentiated V(s') in the target (Trust-PCL)"""
    eval_frequency: int = 10000
    """run a deterministic evaluation every this many environment steps"""
    eval_episodes: int = 10
    """the number of episodes of each deterministic evaluation"""
    log_frequency: int = 100
    """log losses and SPS every this many gradient steps"""
    checkpoint_frequency: int = 0
    """write runs/{run_name}/checkpoint.pt every this many env steps and at the end (0: only when stopped
    by SIGTERM or SIGINT). It holds everything to continue exactly: networks, optimizers, random states,
    the env mid-episode and the replay buffer (4 bytes x (2 obs + action + 2) floats per transition)"""
    resume: str | None = None
    """continue the run saved in this checkpoint, logging to the same TensorBoard run; its flags are
    reused, and only --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None
    """checkpoint and exit when the run reaches this step: one chunk of a longer run (a job time limit),
    continued with --resume; schedules still span --total-timesteps"""
    eval_model: str | None = None
    """evaluate this saved model or checkpoint (env and sizes come from the file) for --eval-episodes
    episodes, with --capture-video if given, and exit"""


def check_args(args: Args) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    if args.eval_frequency < 1:
        raise SystemExit(f"error: --eval-frequency must be >= 1 (got {args.eval_frequency}); it is in env steps")
    if args.learning_starts >= args.total_timesteps:
        raise SystemExit(
            f"error: --learning-starts {args.learning_starts} >= --total-timesteps {args.total_timesteps}: no "
            "gradient step would run; lower --learning-starts"
        )
    if not args.tau > 0:
        raise SystemExit(f"error: --tau must be > 0 (got {args.tau}); the paper uses 0.01 on MuJoCo")
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"error: --alpha must be in [0, 1] (got {args.alpha}); the paper's M-IQ uses 0.9")
    if args.munchausen_clip is not None and not args.munchausen_clip < 0:
        raise SystemExit(f"error: --munchausen-clip must be < 0 (got {args.munchausen_clip}); M-DQN uses -1")
    if args.n_bins < 2:
        raise SystemExit(f"error: --n-bins must be at least 2 (got {args.n_bins}); the paper uses 11")
    if args.checkpoint_frequency < 0:
        raise SystemExit(
            f"error: --checkpoint-frequency must be >= 0 (got {args.checkpoint_frequency}); 0 turns it off"
        )
    if args.batch_size < 1 or args.total_timesteps < 1 or args.buffer_size < 1:
        raise SystemExit("error: --batch-size, --total-timesteps and --buffer-size must be positive")


def check_action_space(env_id: str, space: gym.Space) -> None:
    """IQ's policies need a 1-D Box action space with finite bounds."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise SystemExit(
            f"error: {env_id} has action space {space}; this script needs a 1-D continuous Box "
            "(for discrete actions use soft_dqn_atari.py or soft_a2c_atari.py)"
        )
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise SystemExit(
            f"error: {env_id} has unbounded actions {space}; wrap it in gymnasium.wrappers.ClipAction "
            "or RescaleAction to give it finite bounds"
        )


def check_video_prerequisites(env_id: str) -> None:
    """--capture-video needs moviepy, a renderer for the env (pygame for classic control, a working
    MUJOCO_GL for MuJoCo without a display): fail at start, not at the first evaluation."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise SystemExit("error: --capture-video needs moviepy: pip install moviepy") from None
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except gym.error.DependencyNotInstalled as exc:
        raise SystemExit(f"error: --capture-video on {env_id}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # mujoco.FatalError and friends: no OpenGL context
        raise SystemExit(
            f"error: --capture-video could not render {env_id} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "without a display set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU)"
        ) from None


def make_env(env_id: str, seed: int, capture_video: bool = False, video_folder: str | None = None, every: int = 1):
    try:
        env = gym.make(env_id, render_mode="rgb_array" if capture_video else None)
    except gym.error.Error as exc:  # NameNotFound, VersionNotFound, ...: a typo in --env-id
        raise SystemExit(f"error: --env-id {env_id}: {exc}; see gymnasium's registry (e.g. Hopper-v5)") from None
    if capture_video:  # the first episode of every evaluation (of `every` episodes), one file each
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep % every == 0)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


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
    """ln pi(a|s) = sum_j log_softmax(F^j(s))[a^j] (Section 4). logits (B, m, n), idx (B, m) -> (B,)."""
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
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("scale", (high - low) / 2.0)
        self.register_buffer("bias", (high + low) / 2.0)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = torch.tanh(log_std)
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (log_std + 1)
        return torch.distributions.Normal(mean, log_std.exp())

    def log_prob(self, obs: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        # ln(1 - tanh(u)^2) = 2*(ln 2 - u - softplus(-2u)), the stable form of the tanh Jacobian
        log_det = (2.0 * (np.log(2.0) - raw - F.softplus(-2.0 * raw)) + torch.log(self.scale)).sum(-1)
        return self.dist(obs).log_prob(raw).sum(-1) - log_det

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

    FIELDS = ("obs", "next_obs", "actions", "rewards", "dones")

    def state_dict(self) -> dict:
        """The stored transitions only (clones: saving a slice would save the whole preallocated storage)."""
        stored = {k: getattr(self, k)[: self.size].clone() for k in self.FIELDS}
        return {"capacity": self.capacity, "size": self.size, "pos": self.pos, **stored}

    def load_state_dict(self, state: dict) -> None:
        assert state["capacity"] == self.capacity, "build the buffer with the checkpoint's capacity"
        self.size, self.pos = state["size"], state["pos"]
        for k in self.FIELDS:
            getattr(self, k)[: self.size] = state[k]

    def sample(self, batch_size: int, device: torch.device):
        idx = torch.randint(0, self.size, (batch_size,))
        batch = (self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.dones[idx])
        return tuple(x.to(device, non_blocking=True) for x in batch)


# ---------------------------------------------------------------------------------------------
# Loss and target (pure functions: tensors in, tensors out)
# ---------------------------------------------------------------------------------------------
def miq_target(rewards, dones, log_pi_target, v_next, gamma: float, tau: float, alpha: float, l0=None):
    """The regression target of Eq. (2): r + alpha*clip(tau*ln pi_bar(a|s), l0, 0) + gamma*(1 - done)*V(s').

    `dones` is 1 for terminations only: a time-limit truncation still bootstraps from V(s').
    `l0` clips tau*ln pi_bar to [l0, 0] (M-DQN's clip; None: no clip). The caller decides whether
    V(s') is the target network (M-IQ) or the online one with gradient (--residual, Trust-PCL)."""
    munchausen = tau * log_pi_target
    if l0 is not None:
        munchausen = munchausen.clamp(l0, 0.0)
    return rewards + alpha * munchausen + gamma * (1.0 - dones) * v_next


def iq_loss(log_pi, v, target, tau: float):
    """Eq. (2): mean squared error between the implicit Q (Eq. 1) tau*ln pi(a|s) + V(s) and the target."""
    return (target - (tau * log_pi + v)).pow(2).mean()


def discounted_returns(rewards, gamma: float) -> np.ndarray:
    """G_t = sum_k gamma^k r_{t+k} to the end of the episode, for every step t of one episode."""
    g, out = 0.0, np.zeros(len(rewards))
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


@torch.no_grad()
def evaluate_policy(
    policy: nn.Module, env: gym.Env, n_episodes: int, device, seed: int, value=None, tau=0.01, gamma=0.99
):
    """Deterministic evaluation (the most likely action, the policy's mode): the returns of
    `n_episodes` episodes, and the overestimation diagnostic over every visited state: the mean
    implicit Q-value tau*ln pi(a|s) + V(s) (Eq. 1) of the action taken, and the mean discounted
    return actually obtained from s (to the episode's end, so it is short of the true value near a
    time-limit truncation). Both are nan without `value`."""
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
            discounted.extend(discounted_returns(rewards, gamma))
            rewards = []
            obs, _ = env.reset()
    nan = float("nan")
    return (
        np.array(returns),
        (np.mean(q_estimates) if value is not None else nan),
        (np.mean(discounted) if value is not None else nan),
    )


def evaluate(
    model_path: str,
    env_id: str | None = None,
    eval_episodes: int = 10,
    seed: int = 0,
    device: str = "cpu",
    capture_video: bool = False,
    video_folder: str = "videos/eval",
) -> np.ndarray:
    """Deterministic evaluation returns of a model written by --save-model or a checkpoint. The env
    id and the network sizes come from the file; `env_id` overrides the env (same spaces only)."""
    checkpoint = torch.load(model_path, map_location=device, weights_only=False)  # our own file: trusted
    saved = checkpoint["args"]
    env_id = env_id or saved["env_id"]
    if capture_video:
        check_video_prerequisites(env_id)
    env = make_env(env_id, seed, capture_video, video_folder, eval_episodes)
    policy = make_policy(
        saved["policy"], env.observation_space.shape[0], env.action_space.low, env.action_space.high, saved["n_bins"]
    ).to(device)
    try:
        policy.load_state_dict(checkpoint["policy"])
    except RuntimeError:  # size mismatch
        raise SystemExit(
            f"error: {model_path} was trained on {saved['env_id']}, whose spaces differ from {env_id}'s; "
            f"leave out the env id to use {saved['env_id']}"
        ) from None
    return evaluate_policy(policy, env, eval_episodes, torch.device(device), seed)[0]


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything a run needs to continue exactly where it stopped
# ---------------------------------------------------------------------------------------------
RESUME_OVERRIDES = ("total_timesteps", "checkpoint_frequency", "stop_at", "cuda", "track")


def flags_given(argv: list[str]) -> set[str]:
    """The Args fields named on the command line (`--total-timesteps 5`, `--no-cuda` -> total_timesteps, cuda)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {n[3:] if n.startswith("no_") and n[3:] in Args.__dataclass_fields__ else n for n in names}


def resume_args(args: Args, saved: dict, given: set[str]) -> Args:
    """The checkpointed run's flags, with those of RESUME_OVERRIDES given on the command line; any other
    flag that differs from the run's is refused, since changing it mid-run would make a different run."""
    fields = Args.__dataclass_fields__
    for name in sorted(given & fields.keys() - {"resume", *RESUME_OVERRIDES}):
        if name in saved and getattr(args, name) != saved[name]:
            raise SystemExit(
                f"error: --{name.replace('_', '-')} cannot change on --resume (the run used {saved[name]!r}); "
                "start a new run instead"
            )
    merged = {k: v for k, v in saved.items() if k in fields}  # fields added since keep their defaults
    # --resume and --stop-at come from this command line only: a chunk's stop is not the next chunk's
    merged.update(
        {k: getattr(args, k) for k in ("resume", *RESUME_OVERRIDES) if k in ("resume", "stop_at") or k in given}
    )
    return Args(**merged)


def env_state(env: gym.Env) -> dict:
    """The training env mid-episode, as plain data. The wrappers (time limit, episode statistics)
    pickle as they are, but a MuJoCo env pickles as its constructor's arguments only, so its physics
    (the full integration state, solver warm start included) and random generators go beside."""
    base = env.unwrapped
    state = {
        "pickle": pickle.dumps(env),
        "np_random": base.np_random.bit_generator.state,
        "action_space": env.action_space.np_random.bit_generator.state,
    }
    if hasattr(base, "model") and hasattr(base, "data"):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state["mujoco"] = np.empty(mujoco.mj_stateSize(base.model, spec))
        mujoco.mj_getState(base.model, base.data, state["mujoco"], spec)
    return state


def restore_env(state: dict) -> gym.Env:
    """The env of `env_state`, ready to take the next step of its episode."""
    env = pickle.loads(state["pickle"])
    base = env.unwrapped
    if "mujoco" in state:
        import mujoco

        mujoco.mj_setState(base.model, base.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
    base.np_random.bit_generator.state = state["np_random"]
    env.action_space.np_random.bit_generator.state = state["action_space"]
    return env


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the previous checkpoint whole."""
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_model:
        if not os.path.isfile(args.eval_model):
            raise SystemExit(f"error: --eval-model {args.eval_model}: no such file")
        returns = evaluate(args.eval_model, None, args.eval_episodes, args.seed, "cpu", args.capture_video)
        print(
            f"{args.eval_model}: eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
        )
        raise SystemExit(0)
    checkpoint = None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f"error: --resume {args.resume}: no such file (checkpoints are runs/<run>/checkpoint.pt)")
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)  # our own file: trusted
        args = resume_args(args, checkpoint["args"], flags_given(sys.argv[1:]))
    check_args(args)
    if args.capture_video:
        check_video_prerequisites(args.env_id)
    env = make_env(args.env_id, args.seed)
    check_action_space(args.env_id, env.action_space)
    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, f"videos/{run_name}", args.eval_episodes)

    if args.track:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --track needs wandb: pip install wandb") from None
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    from torch.utils.tensorboard import SummaryWriter

    # on resume, purge_step hides what the stopped run logged after its checkpoint
    writer = SummaryWriter(f"runs/{run_name}", purge_step=checkpoint["global_step"] if checkpoint else None)
    if not checkpoint:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    policy = make_policy(args.policy, obs_dim, low, high, args.n_bins).to(device)
    value = ValueNetwork(obs_dim).to(device)
    policy_target = make_policy(args.policy, obs_dim, low, high, args.n_bins).to(device)
    value_target = ValueNetwork(obs_dim).to(device)
    policy_target.load_state_dict(policy.state_dict())
    value_target.load_state_dict(value.state_dict())
    online_params = list(policy.parameters()) + list(value.parameters())
    target_params, polyak_params = list(policy_target.parameters()) + list(value_target.parameters()), online_params
    # fused Adam: one kernel for all parameters (about 3x faster than the default on a CPU)
    optimizer = torch.optim.Adam(online_params, lr=args.learning_rate, fused=True)  # one loss, one optimizer
    capacity = checkpoint["rb"]["capacity"] if checkpoint else min(args.buffer_size, args.total_timesteps)
    rb = ReplayBuffer(capacity, obs_dim, act_dim)
    print(
        f"{args.exp_name}: {args.env_id}, obs {obs_dim}, actions {act_dim} x {args.policy}"
        f"{f' ({args.n_bins} bins)' if args.policy == 'multicategorical' else ''}, tau={args.tau}, "
        f"alpha={args.alpha}, Munchausen clip {args.munchausen_clip}, device={device}, logging to runs/{run_name}"
    )
    # coming from CleanRL: its `--tau` (Polyak rate) is `--lam` here; `--tau` is the paper's temperature
    print(
        f"--tau {args.tau} is the temperature of Q = tau*ln pi + V and --alpha {args.alpha} the Munchausen "
        f"coefficient (not SAC's temperature); the Polyak rate (CleanRL's --tau) is --lam {args.lam}"
    )

    networks = {"policy": policy, "policy_target": policy_target, "value": value, "value_target": value_target}
    optimizers = {"iq": optimizer}
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"

    def write_checkpoint(step: int) -> None:
        """Everything the loop's step number `step` depends on, written before it runs."""
        save_checkpoint(
            checkpoint_path,
            {
                "args": vars(args),
                "run_name": run_name,
                "global_step": step,
                "networks": {name: net.state_dict() for name, net in networks.items()},
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "rb": rb.state_dict(),
                "env": env_state(env),
                "obs": obs,
                "last_return": last_return,
                "rng": rng_state(),
                "policy": policy.state_dict(),  # --eval-model reads this, as in a saved model
            },
        )

    stop_signals = []

    def request_stop(signum, frame):
        """SIGTERM (Slurm, a job's time limit) or Ctrl-C: checkpoint before the next step, then exit."""
        if stop_signals:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop_signals.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    start_step, last_return = 0, float("nan")
    if checkpoint:
        for name, net in networks.items():
            net.load_state_dict(checkpoint["networks"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        rb.load_state_dict(checkpoint["rb"])
        env = restore_env(checkpoint["env"])
        start_step, obs, last_return = checkpoint["global_step"], checkpoint["obs"], checkpoint["last_return"]
        set_rng_state(checkpoint["rng"])
        print(f"resumed {args.resume} at step {start_step} of {args.total_timesteps}")
        del checkpoint  # its copy of the buffer can be large
    else:
        obs, _ = env.reset(seed=args.seed)

    start_time = time.time()
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or (global_step == args.stop_at and global_step > start_step):
            write_checkpoint(global_step)
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            print(f"stopped by {why} at step {global_step}; continue with --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if args.checkpoint_frequency and global_step > start_step and global_step % args.checkpoint_frequency == 0:
            write_checkpoint(global_step)
        # ---- act: uniform random bins during the warm-up, then sample pi_theta ----
        if global_step < args.learning_starts:
            raw = policy.random(1)
        else:
            with torch.no_grad():
                raw = policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))
        next_obs, reward, terminated, truncated, info = env.step(policy.to_env(raw)[0].cpu().numpy())
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, raw[0].cpu(), reward, next_obs, terminated)
        obs = next_obs
        if terminated or truncated:
            last_return = float(info["episode"]["r"])
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
            obs, _ = env.reset()

        # ---- learn: one gradient step of Eq. (2) per env step ----
        if global_step >= args.learning_starts:
            b_obs, b_raw, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size, device)
            with torch.no_grad():
                log_pi_target = policy_target.log_prob(b_obs, b_raw)
                v_next = value_target(b_next_obs)
            if args.residual:  # Trust-PCL: online V(s'), differentiated
                v_next = value(b_next_obs)
            y = miq_target(
                b_rewards, b_dones, log_pi_target, v_next, args.gamma, args.tau, args.alpha, args.munchausen_clip
            )
            log_pi, v = policy.log_prob(b_obs, b_raw), value(b_obs)
            loss = iq_loss(log_pi, v, y, args.tau)
            if not torch.isfinite(loss):
                raise SystemExit(
                    f"error: the IQ loss is {loss.item()} at step {global_step}: training diverged; "
                    "try a smaller --learning-rate or a larger --tau"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # Polyak averaging of the target network(s)
                torch._foreach_lerp_(target_params, polyak_params, args.lam)

            if global_step % args.log_frequency == 0:
                with torch.no_grad():
                    tau_log_pi = args.tau * log_pi
                writer.add_scalar("losses/iq_loss", loss.item(), global_step)
                writer.add_scalar("losses/v_values", v.mean().item(), global_step)
                writer.add_scalar("losses/tau_log_pi", tau_log_pi.mean().item(), global_step)
                writer.add_scalar("losses/implicit_q_values", (tau_log_pi + v).mean().item(), global_step)
                writer.add_scalar("losses/target_values", y.mean().item(), global_step)
                writer.add_scalar(
                    "charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step
                )

        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            returns, q_estimate, discounted_return = evaluate_policy(
                policy, eval_env, args.eval_episodes, device, args.seed + 10_000, value, args.tau, args.gamma
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            # overestimation diagnostic: the implicit Q of the visited states against what they returned
            writer.add_scalar("eval/q_estimate", q_estimate, global_step)
            writer.add_scalar("eval/discounted_return", discounted_return, global_step)
            sps = int((global_step + 1 - start_step) / (time.time() - start_time))
            print(
                f"step {global_step + 1}/{args.total_timesteps}: eval return {returns.mean():.1f} "
                f"+- {returns.std():.1f}, Q estimate {q_estimate:.1f} vs discounted return {discounted_return:.1f}, "
                f"last train return {last_return:.1f}, SPS {sps}",
                flush=True,
            )

    if args.checkpoint_frequency:  # the end too, so that a finished run can be extended with --resume
        write_checkpoint(args.total_timesteps)
        print(f"checkpoint written to {checkpoint_path}")
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save({"args": vars(args), "policy": policy.state_dict(), "value": value.state_dict()}, model_path)
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, None, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"reloaded model: eval return {returns.mean():.1f} +- {returns.std():.1f}")

    env.close()
    eval_env.close()
    writer.close()
