"""X-SAC: Soft Actor-Critic with a Gumbel-regressed soft value (Extreme Q-Learning), single file.

Paper: Garg, Hejna, Geist, Ermon, "Extreme Q-Learning: MaxEnt RL without Entropy", ICLR 2023.
Docs: docs/xql_online.md (the equations, the choices, the metrics).

Gumbel regression (Eq. 7/11). For a prediction p of a target y and a temperature beta,
z = (y - p)/beta and L(z) = exp(z) - z - 1. By Lemma 3.2 the minimiser over a constant p is
p* = beta * ln E[exp(y/beta)], the soft maximum of the targets: near the max for small beta,
near the mean for large beta. X-SAC uses it to estimate the soft value without an entropy term:

  critics   Q_i(s, a)  <-  r + gamma * (1 - done) * V_bar(s')           squared error, no log-prob
  value     V(s)       <-  min_i Q_i(s, a~pi(.|s))                      Gumbel loss (online critics,
                                                                        fresh policy samples, detached)
  actor     min  E[alpha_sac * ln pi(a|s) - min_i Q_i(s, a)]            exactly as SAC
  alpha_sac          automatic tuning to the target entropy -dim(A)     exactly as SAC

Order per step: critics, value, actor and temperature, Polyak targets. V_bar is the Polyak copy of
V (the critics have no target networks of their own: their target is V_bar).

`--value-loss sac` turns the value loss back into SAC's (Haarnoja et al. 2018, the version with a
value network): V(s) <- min_i Q_i(s, a~pi) - alpha_sac * ln pi(a|s), squared error. The rest of
the file is unchanged, so X-SAC and SAC can be compared from one script.

The stable Gumbel loss (paper App. D.3): clip z from above at c and factor out exp(m) with
m = max(max_batch z, -1) (detached), which rescales the loss of each batch by exp(-m) and keeps
the gradients bounded; the derivation of why the minimiser is unchanged is in `gumbel_loss`.

Defaults follow CleanRL's sac_continuous_action.py (256-256 MLPs, policy lr 3e-4, critic and
value lr 1e-3, batch 256, 5000 random steps, actor every 2 steps, autotuned alpha) so results
compare with it, and the paper's exp clip 8 (the authors' code uses 10). beta comes from a per-env
table, BETA_DEFAULTS (100 on Gym MuJoCo locomotion, 2 elsewhere), printed at start; --beta overrides
it. The paper's DM-Control settings (batch 1024, lr 1e-4, 1024-1024 networks, beta 1-5 per env) are
listed in docs/xql_online.md. Terminations end bootstrapping; time-limit truncations bootstrap from the true last
observation (one env, not a vector env, keeps it at hand).

Usage:
    python xql_sac.py --env-id Hopper-v5
    python xql_sac.py --env-id Hopper-v5 --value-loss sac      # SAC with a value network
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
    """total timesteps of the experiments"""
    buffer_size: int = int(1e6)
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    lam: float = 0.005
    """Polyak rate lambda of the target value network (CleanRL's `tau`; tau is not a temperature here)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int = 5000
    """timestep to start learning; before it, actions are uniform random"""
    policy_lr: float = 3e-4
    """the learning rate of the policy network optimizer"""
    q_lr: float = 1e-3
    """the learning rate of the critic and value network optimizers"""
    hidden_size: int = 256
    """width of the two hidden layers of every network (paper, DM-Control: 1024)"""
    policy_frequency: int = 2
    """the frequency of the actor and temperature updates (delayed, done this many times to compensate)"""
    target_network_frequency: int = 1
    """the frequency of updates of the target value network"""
    alpha: float = 0.2
    """initial entropy temperature alpha_sac (fixed if --no-autotune)"""
    autotune: bool = True
    """automatic tuning of alpha_sac to the target entropy -dim(A)"""
    value_loss: Literal["gumbel", "sac"] = "gumbel"
    """`gumbel`: X-SAC (Gumbel regression on min Q); `sac`: SAC's MSE on min Q - alpha_sac ln pi"""
    beta: float | None = None
    """the Gumbel regression temperature beta; default: the per-env table BETA_DEFAULTS (printed at start)"""
    exp_clip: float = 8.0
    """upper clip c of the normalised residual z = (y - V)/beta in the Gumbel loss, min(z, c) (paper: 8)"""
    eval_frequency: int = 10000
    """run a deterministic evaluation (the policy's mean action) every this many environment steps"""
    eval_episodes: int = 10
    """the number of episodes of each deterministic evaluation"""
    log_frequency: int = 100
    """log losses and SPS every this many steps"""
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


# The default beta per env. V(s) is the Gumbel soft maximum beta*ln E_a~pi[exp(min Q(s, a)/beta)] over
# the policy's own actions, so it sits above their mean by about Var_a[Q]/(2 beta), every backup. The
# paper's 1-5 fit DM Control, whose rewards are in [0, 1] per step. On Hopper-v5, whose Q values are
# ~100 and spread by tens across a stochastic policy's actions, beta 2, 10 and 30 all let V climb far
# above the returns obtained until the runs collapsed; 100 kept eval/q_estimate at the discounted
# return (docs/xql_online.md). The other Gym locomotion entries take the same value untuned.
BETA_DEFAULTS = {"Hopper": 100.0, "Walker2d": 100.0, "HalfCheetah": 100.0, "Ant": 100.0, "Humanoid": 100.0}
BETA_FALLBACK = 2.0


def default_beta(env_id: str) -> float:
    """beta from BETA_DEFAULTS by the env's name (any version), else BETA_FALLBACK."""
    name = env_id.split("/")[-1]
    return next((beta for prefix, beta in BETA_DEFAULTS.items() if name.startswith(prefix)), BETA_FALLBACK)


def check_args(args: Args) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    if args.eval_frequency < 1:
        raise SystemExit(f"error: --eval-frequency must be >= 1 (got {args.eval_frequency}); it is in env steps")
    if args.learning_starts >= args.total_timesteps:
        raise SystemExit(
            f"error: --learning-starts {args.learning_starts} >= --total-timesteps {args.total_timesteps}: no "
            "gradient step would run; lower --learning-starts"
        )
    if args.beta is not None and not args.beta > 0:
        raise SystemExit(f"error: --beta must be > 0 (got {args.beta}); the paper uses 1-5 for X-SAC")
    if not args.exp_clip > 0:
        raise SystemExit(f"error: --exp-clip must be > 0 (got {args.exp_clip}); the paper uses 8")
    if not args.alpha >= 0:
        raise SystemExit(f"error: --alpha must be >= 0 (got {args.alpha}); CleanRL's SAC starts at 0.2")
    if args.checkpoint_frequency < 0:
        raise SystemExit(
            f"error: --checkpoint-frequency must be >= 0 (got {args.checkpoint_frequency}); 0 turns it off"
        )
    if args.batch_size < 1 or args.total_timesteps < 1 or args.buffer_size < 1 or args.policy_frequency < 1:
        raise SystemExit(
            "error: --batch-size, --total-timesteps, --buffer-size and --policy-frequency must be positive"
        )


def check_action_space(env_id: str, space: gym.Space) -> None:
    """The tanh-Gaussian policy needs a 1-D Box action space with finite bounds."""
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
def mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class ValueNetwork(nn.Module):
    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class Actor(nn.Module):
    """SAC's tanh-squashed Gaussian policy, its log-std squashed into [-5, 2]."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, low, high, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * len(low), hidden)
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def get_action(self, obs: torch.Tensor):
        """A reparameterised sample, its log-probability (with the tanh Jacobian), and the mean action."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        normal = torch.distributions.Normal(mean, log_std.exp())
        u = normal.rsample()
        # ln(1 - tanh(u)^2) = 2*(ln 2 - u - softplus(-2u)), the stable form of the tanh Jacobian
        log_det = (2.0 * (np.log(2.0) - u - F.softplus(-2.0 * u)) + torch.log(self.action_scale)).sum(-1)
        log_prob = normal.log_prob(u).sum(-1) - log_det
        action = torch.tanh(u) * self.action_scale + self.action_bias
        return action, log_prob, torch.tanh(mean) * self.action_scale + self.action_bias


class ReplayBuffer:
    """Preallocated FIFO storage of (s, a, r, s', terminated) as CPU tensors."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, act_dim)
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity)  # 1 only for terminations, never for truncations

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs)
        self.next_obs[i] = torch.as_tensor(next_obs)
        self.actions[i] = torch.as_tensor(action)
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
# Losses and targets (pure functions: tensors in, tensors out)
# ---------------------------------------------------------------------------------------------
def gumbel_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float | None) -> torch.Tensor:
    """Gumbel regression (Eq. 7/11) of `pred` on `target`, in the stable max-normalised form (App. D.3).

    With z = (target - pred)/beta, the plain loss is mean(exp(z) - z - 1): convex in pred,
    zero at z = 0, about z^2/2 near it, minimised over a constant pred at beta*ln mean exp(target/beta)
    (Lemma 3.2). Its exp overflows for large z, so with m = max(max_batch z, -1), detached,
        exp(z - m) - z*exp(-m) - exp(-m) = exp(-m) * (exp(z) - z - 1).
    Why the minimiser is kept: within a batch exp(-m) is one positive constant that carries no
    gradient, so the gradient is exp(-m) times the plain gradient mean(1 - exp(z))/beta: it has
    the same sign everywhere and the same zeros, hence the same full-batch minimiser. The scale
    exp(-m) <= e keeps every term bounded (exp(z - m) <= 1), and across minibatches it acts as
    an adaptive learning rate. z is first clipped from above, min(z, clip): only z > 0 can
    overflow, and clipped samples get no gradient. clip=None skips the clip.
    """
    z = (target - pred) / beta
    if clip is not None:
        # from above only (as the offline authors' code): the online code's [-clip, clip] gave zero
        # gradient to a prediction more than clip*beta above its target, so terminal targets stopped
        # pulling Q down and Q drifted toward the value of never falling (measured on Hopper-v5)
        z = z.clamp(max=clip)
    m = z.max().detach().clamp(min=-1.0)
    return (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()


def critic_target(rewards, dones, v_next, gamma: float):
    """X-SAC's critic target (Section 3.4): r + gamma*(1 - done)*V_bar(s'); done = 1 for
    terminations only, no log-prob term (the soft value V carries the entropy)."""
    return rewards + gamma * (1.0 - dones) * v_next


def value_target(q1_pi, q2_pi, log_pi, alpha_sac, value_loss: str):
    """The value network's regression target at fresh policy actions a ~ pi(.|s) (Section 3.4, Eq. 7/11).

    X-SAC (`gumbel`): min_i Q_i(s, a); the Gumbel loss turns it into a soft maximum, no entropy term.
    SAC (`sac`): min_i Q_i(s, a) - alpha_sac * ln pi(a|s) (Haarnoja et al. 2018, value-network SAC)."""
    min_q = torch.min(q1_pi, q2_pi)
    return min_q if value_loss == "gumbel" else min_q - alpha_sac * log_pi


def value_loss_fn(v, target, value_loss: str, beta: float, clip: float):
    """Gumbel regression (Eq. 7/11) for X-SAC, squared error for SAC."""
    return gumbel_loss(v, target, beta, clip) if value_loss == "gumbel" else F.mse_loss(v, target)


def discounted_returns(rewards, gamma: float) -> np.ndarray:
    """G_t = sum_k gamma^k r_{t+k} to the end of the episode, for every step t of one episode."""
    g, out = 0.0, np.zeros(len(rewards))
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


@torch.no_grad()
def evaluate_policy(
    actor: Actor, env: gym.Env, n_episodes: int, device: torch.device, seed: int, critics=(), gamma=0.99
):
    """Deterministic evaluation (the policy's mean action): the returns of `n_episodes` episodes, and
    the overestimation diagnostic over every visited state: the mean of min_i Q_i(s, a) at the action
    taken, and the mean discounted return actually obtained from s (to the episode's end, so it is
    short of the true value near a time-limit truncation). Both are nan when `critics` is empty."""
    returns, q_estimates, discounted, rewards = [], [], [], []
    obs, _ = env.reset(seed=seed)
    while len(returns) < n_episodes:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        _, _, action = actor.get_action(obs_t)
        if critics:
            q_estimates.append(torch.min(torch.stack([qf(obs_t, action) for qf in critics])).item())
        obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
        rewards.append(float(reward))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            discounted.extend(discounted_returns(rewards, gamma))
            rewards = []
            obs, _ = env.reset()
    nan = float("nan")
    return np.array(returns), (np.mean(q_estimates) if critics else nan), (np.mean(discounted) if critics else nan)


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
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    saved_dims = (checkpoint["actor"]["net.0.weight"].shape[1], checkpoint["actor"]["net.4.weight"].shape[0] // 2)
    if (obs_dim, act_dim) != saved_dims:
        raise SystemExit(
            f"error: {model_path} was trained on {saved['env_id']} (obs {saved_dims[0]}, actions {saved_dims[1]}) "
            f"but {env_id} has obs {obs_dim}, actions {act_dim}; leave out the env id to use {saved['env_id']}"
        )
    actor = Actor(obs_dim, env.action_space.low, env.action_space.high, saved["hidden_size"]).to(device)
    actor.load_state_dict(checkpoint["actor"])
    return evaluate_policy(actor, env, eval_episodes, torch.device(device), seed)[0]


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
    beta_source = "--beta" if args.beta is not None else f"the default for {args.env_id}, BETA_DEFAULTS"
    args.beta = args.beta if args.beta is not None else default_beta(args.env_id)
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
    actor = Actor(obs_dim, env.action_space.low, env.action_space.high, args.hidden_size).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
    vf = ValueNetwork(obs_dim, args.hidden_size).to(device)
    vf_target = ValueNetwork(obs_dim, args.hidden_size).to(device)
    vf_target.load_state_dict(vf.state_dict())
    # fused Adam: one kernel for all parameters (about 3x faster than the default on a CPU)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, fused=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.q_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    if args.autotune:
        target_entropy = -float(act_dim)
        log_alpha = torch.tensor([float(np.log(max(args.alpha, 1e-8)))], device=device, requires_grad=True)
        alpha = log_alpha.exp().item()
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr, fused=True)
    else:
        alpha = args.alpha
    capacity = checkpoint["rb"]["capacity"] if checkpoint else min(args.buffer_size, args.total_timesteps)
    rb = ReplayBuffer(capacity, obs_dim, act_dim)
    print(
        f"{args.exp_name}: {args.env_id}, obs {obs_dim}, actions {act_dim}, value loss {args.value_loss}"
        f"{f' (beta={args.beta}, exp clip={args.exp_clip})' if args.value_loss == 'gumbel' else ''}, "
        f"device={device}, logging to runs/{run_name}"
    )
    print(
        f"--alpha {args.alpha} is SAC's initial temperature (as in CleanRL); the Polyak rate (CleanRL's --tau) is --lam {args.lam}"
        + (f"; beta {args.beta} ({beta_source}) is the Gumbel temperature" if args.value_loss == "gumbel" else "")
    )

    networks = {"actor": actor, "qf1": qf1, "qf2": qf2, "vf": vf, "vf_target": vf_target}
    optimizers = {"q": q_optimizer, "v": v_optimizer, "actor": actor_optimizer}
    if args.autotune:
        optimizers["alpha"] = a_optimizer
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
                "log_alpha": log_alpha.detach().cpu() if args.autotune else None,
                "rb": rb.state_dict(),
                "env": env_state(env),
                "obs": obs,
                "last_return": last_return,
                "rng": rng_state(),
                "actor": actor.state_dict(),  # --eval-model reads this, as in a saved model
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
        if args.autotune:
            with torch.no_grad():
                log_alpha.copy_(checkpoint["log_alpha"])
            alpha = log_alpha.exp().item()
        rb.load_state_dict(checkpoint["rb"])
        env = restore_env(checkpoint["env"])
        start_step, obs, last_return = checkpoint["global_step"], checkpoint["obs"], checkpoint["last_return"]
        set_rng_state(checkpoint["rng"])
        print(f"resumed {args.resume} at step {start_step} of {args.total_timesteps}")
        del checkpoint  # its copy of the buffer can be large
    else:
        obs, _ = env.reset(seed=args.seed)

    start_time = time.time()
    actor_loss, alpha_loss = torch.tensor(float("nan")), torch.tensor(float("nan"))
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or (global_step == args.stop_at and global_step > start_step):
            write_checkpoint(global_step)
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            print(f"stopped by {why} at step {global_step}; continue with --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if args.checkpoint_frequency and global_step > start_step and global_step % args.checkpoint_frequency == 0:
            write_checkpoint(global_step)
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action, _, _ = actor.get_action(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))
            action = action[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, action, reward, next_obs, terminated)
        obs = next_obs
        if terminated or truncated:
            last_return = float(info["episode"]["r"])
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:
            b_obs, b_actions, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size, device)
            # ---- critics: squared error to r + gamma(1 - done) V_bar(s') ----
            with torch.no_grad():
                q_target = critic_target(b_rewards, b_dones, vf_target(b_next_obs), args.gamma)
            qf1_a, qf2_a = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
            qf1_loss, qf2_loss = F.mse_loss(qf1_a, q_target), F.mse_loss(qf2_a, q_target)
            q_optimizer.zero_grad(set_to_none=True)
            (qf1_loss + qf2_loss).backward()
            q_optimizer.step()

            # ---- value: Gumbel regression on min_i Q_i(s, a ~ pi), online critics just updated ----
            # The same fresh sample and critic values serve the first actor update below (the value
            # step changes neither actor nor critics), so they keep their graph on actor steps.
            actor_step = global_step % args.policy_frequency == 0
            with torch.set_grad_enabled(actor_step):
                pi, log_pi, _ = actor.get_action(b_obs)
                q1_pi, q2_pi = qf1(b_obs, pi), qf2(b_obs, pi)
            v_target = value_target(q1_pi.detach(), q2_pi.detach(), log_pi.detach(), alpha, args.value_loss)
            v = vf(b_obs)
            v_loss = value_loss_fn(v, v_target, args.value_loss, args.beta, args.exp_clip)
            v_optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            v_optimizer.step()
            if not (torch.isfinite(v_loss) and torch.isfinite(qf1_loss) and torch.isfinite(qf2_loss)):
                raise SystemExit(
                    f"error: a loss is not finite at step {global_step} (value {v_loss.item()}, critics "
                    f"{qf1_loss.item()}, {qf2_loss.item()}): training diverged; try a larger --beta or a "
                    "smaller --exp-clip"
                )

            # ---- actor and temperature, exactly as SAC (delayed, TD3-style) ----
            if actor_step:
                for i in range(args.policy_frequency):
                    if i > 0:  # CleanRL repeats the delayed update, each time with a fresh sample
                        pi, log_pi, _ = actor.get_action(b_obs)
                        q1_pi, q2_pi = qf1(b_obs, pi), qf2(b_obs, pi)
                    actor_loss = (alpha * log_pi - torch.min(q1_pi, q2_pi)).mean()
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    actor_optimizer.step()
                    if args.autotune:
                        alpha_loss = (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()
                        a_optimizer.zero_grad(set_to_none=True)
                        alpha_loss.backward()
                        a_optimizer.step()
                        alpha = log_alpha.exp().item()

            if global_step % args.target_network_frequency == 0:
                with torch.no_grad():
                    torch._foreach_lerp_(list(vf_target.parameters()), list(vf.parameters()), args.lam)

            if global_step % args.log_frequency == 0:
                writer.add_scalar("losses/qf1_values", qf1_a.mean().item(), global_step)
                writer.add_scalar("losses/qf2_values", qf2_a.mean().item(), global_step)
                writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                writer.add_scalar("losses/qf_loss", (qf1_loss + qf2_loss).item() / 2.0, global_step)
                writer.add_scalar("losses/v_values", v.mean().item(), global_step)
                writer.add_scalar("losses/v_target_values", v_target.mean().item(), global_step)
                writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
                # the largest normalised residual z of the batch: it explodes when XQL goes unstable
                writer.add_scalar("losses/max_z", ((v_target - v) / args.beta).max().item(), global_step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                writer.add_scalar("losses/alpha", alpha, global_step)
                if args.autotune:
                    writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                writer.add_scalar(
                    "charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step
                )

        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            returns, q_estimate, discounted_return = evaluate_policy(
                actor, eval_env, args.eval_episodes, device, args.seed + 10_000, (qf1, qf2), args.gamma
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            # overestimation diagnostic: the critics' value of the visited states against what they returned
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
        torch.save(
            {
                "args": vars(args),
                "actor": actor.state_dict(),
                "qf1": qf1.state_dict(),
                "qf2": qf2.state_dict(),
                "vf": vf.state_dict(),
            },
            model_path,
        )
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, None, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"reloaded model: eval return {returns.mean():.1f} +- {returns.std():.1f}")

    env.close()
    eval_env.close()
    writer.close()
