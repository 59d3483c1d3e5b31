"""X-SAC: Soft Actor-Critic whose soft value is learned by Gumbel regression, no entropy in targets.

Garg, Hejna, Geist, Ermon, "Extreme Q-Learning: MaxEnt RL without Entropy", ICLR 2023, Sec. 3.4.
Docs: docs/xql_online.md. `--value-loss sac` is SAC with a value network, from the same file.

  Gumbel loss  L(p; y) = E[exp(z) - z - 1], z = (y - p)/beta;  argmin_p = beta ln E[exp(y/beta)]
  critics      Q_i(s, a) <- r + gamma (1 - terminated) V_bar(s')               squared error
  value        V(s) <- min_i Q_i(s, a),  a ~ pi(.|s)                          Gumbel loss
               SAC:  V(s) <- min_i Q_i(s, a) - alpha ln pi(a|s)               squared error
  actor        min E[alpha ln pi(a|s) - min_i Q_i(s, a)]                      as SAC
  temperature  min E[-alpha (ln pi(a|s) - dim(A))]                            as SAC

V_bar is the Polyak average of V; the critics have no target networks of their own. No target has
an alpha ln pi term (V's Gumbel fit stands for it); the actor and temperature keep SAC's. Defaults
follow CleanRL's sac_continuous_action.py; beta comes from BETA_DEFAULTS per env (see --help).

    python xql_sac.py --env-id dm_control/cheetah-run-v0
    python xql_sac.py --env-id Hopper-v5 --value-loss sac
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
from typing import Annotated, Literal

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
    total_timesteps: int = 1000000  # total timesteps of the experiments
    buffer_size: int = int(1e6)  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    lam: Annotated[float, tyro.conf.arg(aliases=("--tau",))] = 0.005
    """Polyak rate lambda of the target value network (CleanRL's `tau`, also accepted)"""
    batch_size: int = 256  # the size of a batch sampled from the replay memory
    learning_starts: int = 5000  # the step to start learning; uniform random actions before
    policy_lr: float = 3e-4  # the learning rate of the policy network optimizer
    q_lr: float = 1e-3  # the learning rate of the critic, value and temperature optimizers
    hidden_size: int = 256  # width of every network's two hidden layers (the paper on DMC: 1024)
    ortho_init: bool = False  # orthogonal weights, zero biases, as the authors' online code
    policy_frequency: int = 2  # the frequency of the actor and temperature updates
    policy_repeats: int | None = None  # updates at each: policy_frequency as CleanRL (authors: 1)
    target_network_frequency: int = 1  # the frequency of updates of the target value network
    alpha: float = 0.2
    """temperature alpha_sac, or its start if autotuned (CleanRL starts at 1, the authors at 0.1)"""
    autotune: bool = True  # automatic tuning of alpha_sac to the target entropy -dim(A)
    value_loss: Literal["gumbel", "sac"] = "gumbel"  # X-SAC; `sac`: MSE on min Q - alpha ln pi
    beta: float | None = None
    """Gumbel temperature beta; by env: cheetah-run, walker-run 2, hopper-hop 1, quadruped-run 5,
    Gym MuJoCo 100, else 2"""
    exp_clip: float = 8.0  # upper clip c of the Gumbel loss's residual z = (y - V)/beta

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


# V sits above the mean of min Q over the policy's actions by about Var[Q]/(2 beta): Gym MuJoCo
# (Q ~ 100, spread by tens) needs 100, not the paper's 1-5 (docs/xql_online.md)
BETA_DEFAULTS = dict.fromkeys(("Hopper", "Walker2d", "HalfCheetah", "Ant", "Humanoid"), 100.0)
# DMC: the authors' sac_experiments.json; Table 6 prints walker-run 1, hopper-hop 2: the two swapped
BETA_DEFAULTS.update({"cheetah-run": 2.0, "walker-run": 2.0, "hopper-hop": 1.0, "quadruped-run": 5})
BETA_FALLBACK = 2.0


def default_beta(env_id: str) -> float:
    """beta from BETA_DEFAULTS by the env's name (any version), else BETA_FALLBACK."""
    name = env_id.split("/")[-1]
    return next((b for key, b in BETA_DEFAULTS.items() if name.startswith(key)), BETA_FALLBACK)


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


def mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, out_dim))


def orthogonal_init(layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        nn.init.orthogonal_(layer.weight)
        nn.init.zeros_(layer.bias)


class Critic(nn.Module):
    """A scalar of the concatenated inputs: V(s), or Q(s, a), the action after the observation."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(in_dim, 1, hidden)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1)).squeeze(-1)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """SAC's tanh-squashed Gaussian policy, its log-std squashed into [-5, 2]."""

    def __init__(self, obs_dim: int, low, high, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * len(low), hidden)
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (low, high))
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def get_action(self, obs: torch.Tensor):
        """A reparameterised sample, its log-probability (with the tanh Jacobian), the mean."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        normal = torch.distributions.Normal(mean, log_std.exp())
        u = normal.rsample()
        # ln(1 - tanh(u)^2) = 2 (ln 2 - u - softplus(-2u)), the stable form of the tanh Jacobian
        log_det = 2.0 * (np.log(2.0) - u - F.softplus(-2.0 * u)) + torch.log(self.action_scale)
        log_prob = normal.log_prob(u).sum(-1) - log_det.sum(-1)
        action = torch.tanh(u) * self.action_scale + self.action_bias
        return action, log_prob, torch.tanh(mean) * self.action_scale + self.action_bias

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action, tanh of the mean (drawn with a sample, as get_action)."""
        return self.get_action(obs)[2]


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


def gumbel_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float | None):
    """Gumbel regression (Eq. 7/11) of `pred` on `target`, in the stable form of App. D.3.

    With z = (target - pred)/beta: mean(exp(z) - z - 1), minimised by a constant pred at
    beta ln mean exp(target/beta) (Lemma 3.2). Computed as exp(-m) (exp(z) - z - 1) with
    m = max(max z, -1) detached: one positive factor per batch (the same minimiser), every term
    bounded. z is first clipped from above at `clip` (clipped samples get no gradient)."""
    z = (target - pred) / beta
    if clip is not None:
        # from above only, as the authors' offline code; their online code clips to [-c, c], which
        # stops a Q far above a terminal target from being pulled down (docs/xql_online.md)
        z = z.clamp(max=clip)
    m = z.max().detach().clamp(min=-1.0)
    return (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()


def critic_target(rewards, dones, v_next, gamma: float):
    """y = r + gamma (1 - terminated) V_bar(s') (Sec. 3.4): no log-prob, V carries the entropy."""
    return rewards + gamma * (1.0 - dones) * v_next


def critic_loss(q1, q2, y):
    """Squared error of each critic to the same target y (Sec. 3.4)."""
    return F.mse_loss(q1, y), F.mse_loss(q2, y)


def soft_value_sample(q1_pi, q2_pi, log_pi, alpha_sac: float, value_loss: str):
    """What V(s) regresses on, at a fresh a ~ pi(.|s): min_i Q_i(s, a) for X-SAC (Eq. 7/11), and
    min_i Q_i(s, a) - alpha_sac ln pi(a|s) for SAC (Haarnoja et al. 2018, Eq. 3)."""
    min_q = torch.min(q1_pi, q2_pi)
    return min_q if value_loss == "gumbel" else min_q - alpha_sac * log_pi


def value_loss_fn(v, target, value_loss: str, beta: float, clip: float):
    """Gumbel regression (Eq. 7/11) for X-SAC, squared error for SAC."""
    return gumbel_loss(v, target, beta, clip) if value_loss == "gumbel" else F.mse_loss(v, target)


def actor_loss_fn(log_pi, q1_pi, q2_pi, alpha_sac: float):
    """SAC's policy loss E[alpha ln pi(a|s) - min_i Q_i(s, a)] (Haarnoja et al. 2018, Eq. 7)."""
    return (alpha_sac * log_pi - torch.min(q1_pi, q2_pi)).mean()


def temperature_loss(log_alpha, log_pi, target_entropy: float):
    """SAC's temperature loss E[-alpha (ln pi(a|s) + H_target)] (Haarnoja et al. 2018b, Eq. 18)."""
    return (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()


def polyak(target: nn.Module, online: nn.Module, lam: float) -> None:
    """theta_bar <- (1 - lam) theta_bar + lam theta."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.lerp_(p, lam)


def update(batch, learner: dict, args: Args, target_entropy: float, step: int) -> dict:
    """One gradient step on a sampled batch: both critics, then V on the critics just updated, then
    every `policy_frequency` steps the actor and temperature (that many times, as CleanRL), then the
    Polyak average V_bar. Returns the losses and estimates to log, detached."""
    b_obs, b_actions, b_rewards, b_next_obs, b_dones = batch
    actor, qf1, qf2, vf = (learner[k] for k in ("actor", "qf1", "qf2", "vf"))
    log_alpha = learner["log_alpha"]
    alpha = log_alpha.exp().item() if args.autotune else args.alpha
    with torch.no_grad():
        q_target = critic_target(b_rewards, b_dones, learner["vf_target"](b_next_obs), args.gamma)
    qf1_a, qf2_a = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
    qf1_loss, qf2_loss = critic_loss(qf1_a, qf2_a, q_target)
    learner["q_optimizer"].zero_grad(set_to_none=True)
    (qf1_loss + qf2_loss).backward()
    learner["q_optimizer"].step()

    # value, on the critics just updated; the same sample serves the first actor update below (the
    # value step changes neither actor nor critics), so it keeps its graph
    actor_step = step % args.policy_frequency == 0
    with torch.set_grad_enabled(actor_step):
        pi, log_pi, _ = actor.get_action(b_obs)
        q1_pi, q2_pi = qf1(b_obs, pi), qf2(b_obs, pi)
    v_target = soft_value_sample(q1_pi.detach(), q2_pi.detach(), log_pi.detach(), alpha,
                                 args.value_loss)
    v = vf(b_obs)
    v_loss = value_loss_fn(v, v_target, args.value_loss, args.beta, args.exp_clip)
    learner["v_optimizer"].zero_grad(set_to_none=True)
    v_loss.backward()
    learner["v_optimizer"].step()
    logs = dict(q_target=q_target, qf1_a=qf1_a.detach(), qf2_a=qf2_a.detach(), v=v.detach(),
                v_target=v_target, qf1_loss=qf1_loss.detach(), qf2_loss=qf2_loss.detach(),
                value_loss=v_loss.detach())

    repeats = args.policy_frequency if args.policy_repeats is None else args.policy_repeats
    if actor_step:  # delayed as CleanRL, repeated to compensate, a fresh sample each time
        for i in range(repeats):
            if i > 0:
                pi, log_pi, _ = actor.get_action(b_obs)
                q1_pi, q2_pi = qf1(b_obs, pi), qf2(b_obs, pi)
            actor_loss = actor_loss_fn(log_pi, q1_pi, q2_pi, alpha)
            learner["actor_optimizer"].zero_grad(set_to_none=True)
            actor_loss.backward()
            learner["actor_optimizer"].step()
            logs["actor_loss"] = actor_loss.detach()
            if args.autotune:
                alpha_loss = temperature_loss(log_alpha, log_pi, target_entropy)
                learner["a_optimizer"].zero_grad(set_to_none=True)
                alpha_loss.backward()
                learner["a_optimizer"].step()
                alpha = log_alpha.exp().item()
                logs["alpha_loss"] = alpha_loss.detach()

    if step % args.target_network_frequency == 0:
        polyak(learner["vf_target"], vf, args.lam)
    return {**logs, "alpha": alpha}


def train(args: Args) -> None:
    args, run = start_run(args)  # --eval-model; resume, checks, envs, name, writer, seeds: appendix
    env, device = run.env, run.device
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = Actor(obs_dim, env.action_space.low, env.action_space.high, args.hidden_size).to(device)
    qf1 = Critic(obs_dim + act_dim, args.hidden_size).to(device)
    qf2 = Critic(obs_dim + act_dim, args.hidden_size).to(device)
    vf = Critic(obs_dim, args.hidden_size).to(device)
    vf_target = Critic(obs_dim, args.hidden_size).to(device)
    if args.ortho_init:  # the authors' online init; PyTorch's default otherwise, as CleanRL
        for net in (actor, qf1, qf2, vf):
            net.apply(orthogonal_init)
    vf_target.load_state_dict(vf.state_dict())
    # fused Adam: one kernel for all parameters
    q_optimizer = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=args.q_lr, fused=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.q_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    target_entropy = -float(act_dim)
    log_alpha = torch.tensor([float(np.log(max(args.alpha, 1e-8)))], device=device)
    log_alpha.requires_grad_()  # from --alpha 0.2, SAC's: CleanRL starts at 1, the authors at 0.1
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr, fused=True)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    learner = dict(actor=actor, qf1=qf1, qf2=qf2, vf=vf, vf_target=vf_target, log_alpha=log_alpha)
    learner.update(q_optimizer=q_optimizer, v_optimizer=v_optimizer, a_optimizer=a_optimizer, rb=rb)
    learner.update(actor_optimizer=actor_optimizer)
    env, obs = run.restore(learner)  # a checkpoint's learner, buffer and episode, or a new episode
    logs = dict(actor_loss=torch.tensor(float("nan")), alpha_loss=torch.tensor(float("nan")))
    for global_step in range(run.start_step, args.total_timesteps):
        run.stop_if_asked(global_step, learner, obs)  # SIGTERM, Ctrl-C, --stop-at: checkpoint, exit
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                action, _, _ = actor.get_action(obs_t.unsqueeze(0))
            action = action[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, action, reward, next_obs, terminated)
        obs = next_obs
        if terminated or truncated:
            run.log_episode(info, global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:
            batch = rb.sample(args.batch_size, device)
            logs.update(update(batch, learner, args, target_entropy, global_step))
            log_update(run, logs, args, rb, global_step)  # every step: stops a diverging run

        if run.evaluation_due(global_step + 1):  # the mean action; min Q against the returns
            run.evaluate(global_step, actor, [qf1, qf2], args.gamma)
        run.step_done(global_step + 1, learner, obs)  # periodic checkpoint, progress line
    run.finish({name: learner[name].state_dict() for name in ("actor", "qf1", "qf2", "vf")})


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
        (min(args.policy_lr, args.q_lr) > 0, "--policy-lr and --q-lr must be > 0"),
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
        (args.beta is None or args.beta > 0, f"--beta must be > 0 (got {args.beta})"),
        (args.exp_clip > 0, f"--exp-clip must be > 0 (got {args.exp_clip}); the paper uses 8"),
        (args.alpha >= 0, f"--alpha must be >= 0 (got {args.alpha})"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
        (min(args.batch_size, args.buffer_size, args.policy_frequency) >= 1,
         "--batch-size, --buffer-size and --policy-frequency must be positive"),
        (args.policy_repeats is None or args.policy_repeats >= 1, "--policy-repeats must be >= 1"),
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
    of a checkpoint with --resume, the checks, beta by env, the env and a Run (name, writer...)."""
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", args.capture_video)
        print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    beta_source = "--beta" if args.beta is not None else f"the default for {args.env_id}"
    beta_source = "the run's" if checkpoint else beta_source
    args.beta = args.beta if args.beta is not None else default_beta(args.env_id)
    env = make_env(args.env_id, args.seed)
    check_action_space(args.env_id, env.action_space)
    run = Run(args, checkpoint, env)
    value = f"beta {args.beta} ({beta_source})" if args.value_loss == "gumbel" else "SAC value loss"
    # printed by Run.restore, just before the loop
    run.banner = (
        f"{SCRIPT}: {args.env_id}, {value}, alpha {args.alpha}, {run.device}, runs/{run.name}"
    )
    return args, run


def log_update(run: "Run", logs: dict, args: Args, rb: ReplayBuffer, step: int) -> None:
    """Stop a run whose losses are not finite; every --log-frequency steps, stop one whose values
    run away, and log the last update's losses and estimates."""
    if not torch.isfinite(logs["value_loss"] + logs["qf1_loss"] + logs["qf2_loss"]):
        sys.exit(f"error: a loss is not finite at step {step}; try a larger --beta")
    if step % args.log_frequency != 0:
        return
    bonus = logs["alpha"] * rb.actions.shape[1] * (args.value_loss == "sac")  # SAC's |alpha H|
    check_values(logs["qf1_a"], rb.rewards[: rb.size], args.gamma, bonus, step)
    # max_z, the largest residual z of the batch, explodes when X-SAC goes unstable
    scalars = dict(qf1_values=logs["qf1_a"].mean(), qf2_values=logs["qf2_a"].mean(),
                   v_values=logs["v"].mean(), v_target_values=logs["v_target"].mean(),
                   qf1_loss=logs["qf1_loss"], qf2_loss=logs["qf2_loss"],
                   qf_loss=(logs["qf1_loss"] + logs["qf2_loss"]) / 2.0,
                   value_loss=logs["value_loss"],
                   alpha=logs["alpha"], max_z=((logs["v_target"] - logs["v"]) / args.beta).max(),
                   actor_loss=logs["actor_loss"])
    if args.autotune:
        scalars["alpha_loss"] = logs["alpha_loss"]
    run.log(scalars, step)


def check_values(values, rewards, gamma: float, bonus: float, step: int) -> None:
    """Stop a run whose values run away with finite losses: mean |values| over ten times
    (max |r| + bonus)/(1 - gamma), the largest discounted return; bonus: a step's entropy term."""
    bound = (rewards.abs().max().item() + bonus) / max(1.0 - gamma, 1e-8)
    if 0 < 10 * bound < (mean := values.abs().mean().item()):
        sys.exit(f"error: the values diverged at step {step} (mean |Q| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a larger --beta (X-SAC) or a smaller --q-lr")


@torch.no_grad()
def evaluate_policy(actor, env, n_episodes: int, device, seed: int, critics=(), gamma=0.99):
    """Deterministic evaluation (the actor's mode): the returns of `n_episodes` episodes, and over
    every visited state the mean of min_i Q_i(s, a) against the mean discounted return from s (to
    the episode's end: short of the true value near a truncation); nan without `critics`."""
    returns, q_estimates, discounted, rewards = [], [], [], []
    obs, _ = env.reset(seed=seed)
    while len(returns) < n_episodes:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        action = actor.mode(obs_t)
        if critics:
            q_estimates.append(torch.min(torch.stack([qf(obs_t, action) for qf in critics])).item())
        obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
        rewards.append(float(reward))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            g, start = 0.0, len(discounted)
            for r in reversed(rewards):  # the discounted return from each step to the episode's end
                g = r + gamma * g
                discounted.insert(start, g)
            rewards = []
            obs, _ = env.reset()
    mean = lambda x: float(np.mean(x)) if critics else float("nan")  # noqa: E731
    return np.array(returns), mean(q_estimates), mean(discounted)


def evaluate(path: str, eval_episodes=10, seed=0, device="cpu", capture_video=False) -> np.ndarray:
    """Deterministic evaluation returns of a saved model or checkpoint, on the env it names."""
    saved = load_checkpoint(path, "--eval-model")
    env_id, hidden = saved["args"]["env_id"], saved["args"]["hidden_size"]
    if capture_video:
        check_video_prerequisites(env_id)
    env = make_env(env_id, seed, capture_video, "videos/eval", eval_episodes)
    space = env.action_space
    actor = Actor(env.observation_space.shape[0], space.low, space.high, hidden)
    actor.load_state_dict(saved["actor"])
    return evaluate_policy(actor.to(device), env, eval_episodes, torch.device(device), seed)[0]


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
