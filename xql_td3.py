"""X-TD3: TD3 whose critics are trained by Gumbel regression (Extreme Q-Learning), no entropy term.

Garg, Hejna, Geist, Ermon, "Extreme Q-Learning: MaxEnt RL without Entropy", ICLR 2023, Sec. 3.4.
Docs: docs/xql_online.md. `--critic-loss mse` is TD3 (Fujimoto et al. 2018), from the same file.

  Gumbel loss  L(p; y) = E[exp(z) - z - 1], z = (y - p)/beta;  argmin_p = beta ln E[exp(y/beta)]
  critics      Q_i(s, a) <- y = r + gamma (1 - terminated) min_j Q_bar_j(s', a~)    Gumbel loss
               a~ = clip(pi_bar(s') + clip(N(0, sigma), -c, c), low, high)       TD3's smoothing
  actor        max Q_1(s, pi(s)), every 2 steps, then Polyak targets               as TD3

With deterministic dynamics the only randomness in y is the target-smoothing noise of the next
action, so the Gumbel loss makes Q a soft maximum over that noise alone (Eq. 9 with a deterministic
policy): about its mean plus sigma_Q^2/(2 beta), not a stochastic policy's soft-optimal backup.
`--no-double-q` is the paper's "X-TD3 - DQ", one critic. Defaults follow CleanRL's
td3_continuous_action.py; beta comes from BETA_DEFAULTS per env (see --help).

    python xql_td3.py --env-id dm_control/cheetah-run-v0
    python xql_td3.py --env-id Hopper-v5 --critic-loss mse
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
    env_id: str = "Hopper-v5"
    """a gymnasium env with a bounded Box action space, or dm_control/<domain>-<task>-v0"""
    total_timesteps: int = 1000000  # total timesteps of the experiments
    learning_rate: float = 3e-4
    """the learning rate of the actor and critic optimizers (the paper: 1e-3)"""
    buffer_size: int = int(1e6)  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    lam: Annotated[float, tyro.conf.arg(aliases=("--tau",))] = 0.005
    """Polyak rate lambda of the target networks (CleanRL's `tau`, also accepted)"""
    batch_size: int = 256  # the size of a batch sampled from the replay memory
    hidden_size: int = 256  # width of the two hidden layers of every network
    policy_noise: float = 0.2
    """the scale of the target policy smoothing noise (in units of the action half-range)"""
    exploration_noise: float | None = None
    """the scale of the exploration noise; default 0.1, 0.05 on hopper-hop as the authors' runs"""
    learning_starts: int = 25000
    """timestep to start learning; before it, actions are uniform random"""
    policy_frequency: int = 2  # the frequency of the (delayed) actor and target network updates
    noise_clip: float = 0.5
    """noise clip of the target policy smoothing (in units of the action half-range)"""
    critic_loss: Literal["gumbel", "mse"] = "gumbel"
    """`gumbel`: X-TD3 (Gumbel regression of the critics); `mse`: TD3"""
    double_q: bool = True
    """the min of two critics in the target; `--no-double-q`: the paper's X-TD3 - DQ, one critic"""
    beta: float | None = None
    """Gumbel temperature beta; by env: cheetah-run 5, walker-run 2, hopper-hop 2, quadruped-run 5,
    Gym MuJoCo 10, else 3"""
    exp_clip: float = 8.0
    """upper clip c of the residual z = (y - Q)/beta in the Gumbel loss (the paper: 8)"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 10000
    """evaluate the policy, without exploration noise, every this many environment steps"""
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


# DM Control takes the paper's Table 6 (rewards in [0, 1] a step). Gym MuJoCo's larger rewards, TD
# errors and Gumbel bias sigma^2/(2 beta) need a larger beta: 10, chosen on Hopper-v5, not
# tuned on the other Gym tasks (docs/xql_online.md).
BETA_DEFAULTS = dict.fromkeys(("Hopper", "Walker2d", "HalfCheetah", "Ant", "Humanoid"), 10.0)
BETA_DEFAULTS.update({"cheetah-run": 5.0, "walker-run": 2.0, "hopper-hop": 2.0, "quadruped-run": 5})
BETA_FALLBACK = 3.0


def default_beta(env_id: str) -> float:
    """beta from BETA_DEFAULTS by the env's name (any version), else BETA_FALLBACK."""
    name = env_id.split("/")[-1]
    return next((b for key, b in BETA_DEFAULTS.items() if name.startswith(key)), BETA_FALLBACK)


def default_exploration_noise(env_id: str) -> float:
    """0.05 on hopper-hop, as the authors' td3_2q_experiments.json runs it; TD3's 0.1 elsewhere."""
    return 0.05 if "hopper-hop" in env_id else 0.1

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


class QNetwork(nn.Module):
    """Q(s, a): the action concatenated to the observation."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class Actor(nn.Module):
    """TD3's deterministic policy: tanh output scaled to the action bounds."""

    def __init__(self, obs_dim: int, low, high, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, len(low), hidden)
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (low, high))
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs)) * self.action_scale + self.action_bias


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

    With z = (target - pred)/beta the loss is mean(exp(z) - z - 1), minimised over a constant pred
    at beta ln mean exp(target/beta) (Lemma 3.2). With m = max(max_batch z, -1), detached, it is
    computed as exp(z - m) - z exp(-m) - exp(-m) = exp(-m) (exp(z) - z - 1): one positive constant
    per batch, so the gradient keeps its sign and zeros (the same minimiser) while every term stays
    bounded. z is first clipped from above at `clip` (clipped samples get no gradient)."""
    z = (target - pred) / beta
    if clip is not None:
        # from above only, as the authors' offline code; their online code clips to [-c, c], which
        # stops a Q far above a terminal target from being pulled down (docs/xql_online.md)
        z = z.clamp(max=clip)
    m = z.max().detach().clamp(min=-1.0)
    return (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()


def xtd3_target(rewards, dones, q1_next, q2_next, gamma: float, double_q: bool):
    """Eq. 9's target y = r + gamma (1 - terminated) min_i Q_bar_i(s', a~) (Q_bar_1 alone without
    double Q), at the smoothed target action a~; a truncation still bootstraps."""
    q_next = torch.min(q1_next, q2_next) if double_q else q1_next
    return rewards + gamma * (1.0 - dones) * q_next


def critic_loss_fn(q, target, critic_loss: str, beta: float, clip: float):
    """Gumbel regression (Eq. 7/11, on the target of Eq. 9) for X-TD3, squared error for TD3."""
    return gumbel_loss(q, target, beta, clip) if critic_loss == "gumbel" else F.mse_loss(q, target)


def actor_loss_fn(q1_pi):
    """TD3's deterministic policy gradient: maximise Q_1(s, pi(s)) (Fujimoto et al. 2018)."""
    return -q1_pi.mean()


def polyak(target: nn.Module, online: nn.Module, lam: float) -> None:
    """theta_bar <- (1 - lam) theta_bar + lam theta."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.lerp_(p, lam)


def update(batch, learner: dict, args: Args, bounds, step: int) -> dict:
    """One gradient step on a sampled batch: the critics on Eq. 9's target at the smoothed target
    action, then every `policy_frequency` steps the actor and the Polyak targets (TD3's delay).
    Returns the losses and estimates to log, detached."""
    b_obs, b_actions, b_rewards, b_next_obs, b_dones = batch
    actor, actor_target = learner["actor"], learner["actor_target"]
    n_critics = 2 if args.double_q else 1
    critics = [learner[f"qf{i}"] for i in range(1, n_critics + 1)]
    critics_target = [learner[f"qf{i}_target"] for i in range(1, n_critics + 1)]
    with torch.no_grad():
        noise = torch.randn_like(b_actions) * args.policy_noise
        noise = noise.clamp(-args.noise_clip, args.noise_clip) * actor.action_scale
        next_actions = (actor_target(b_next_obs) + noise).clamp(*bounds)
        q_next = [qf_target(b_next_obs, next_actions) for qf_target in critics_target]
        y = xtd3_target(b_rewards, b_dones, q_next[0], q_next[-1], args.gamma, args.double_q)
    q_values = [qf(b_obs, b_actions) for qf in critics]
    q_losses = [critic_loss_fn(q, y, args.critic_loss, args.beta, args.exp_clip) for q in q_values]
    q_loss = sum(q_losses)
    learner["q_optimizer"].zero_grad(set_to_none=True)
    q_loss.backward()
    learner["q_optimizer"].step()
    logs = dict(y=y, q_values=[q.detach() for q in q_values], q_loss=q_loss.detach(),
                q_losses=[loss.detach() for loss in q_losses])

    if step % args.policy_frequency == 0:  # delayed actor and Polyak targets, as TD3
        actor_loss = actor_loss_fn(critics[0](b_obs, actor(b_obs)))
        learner["actor_optimizer"].zero_grad(set_to_none=True)
        actor_loss.backward()
        learner["actor_optimizer"].step()
        for target, online in [(actor_target, actor), *zip(critics_target, critics)]:
            polyak(target, online, args.lam)
        logs["actor_loss"] = actor_loss.detach()
    return logs

def train(args: Args) -> None:
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", args.capture_video)
        return print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    beta_source = "--beta" if args.beta is not None else f"the default for {args.env_id}"
    beta_source = "the run's" if checkpoint else beta_source
    args.beta = args.beta if args.beta is not None else default_beta(args.env_id)
    if args.exploration_noise is None:
        args.exploration_noise = default_exploration_noise(args.env_id)
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
    actor = Actor(obs_dim, low, high, args.hidden_size).to(device)
    actor_target = Actor(obs_dim, low, high, args.hidden_size).to(device)
    actor_target.load_state_dict(actor.state_dict())
    n_critics = 2 if args.double_q else 1
    critics = [QNetwork(obs_dim, act_dim, args.hidden_size).to(device) for _ in range(n_critics)]
    critics_target = [QNetwork(obs_dim, act_dim, args.hidden_size).to(device) for _ in critics]
    for qf, qf_target in zip(critics, critics_target):
        qf_target.load_state_dict(qf.state_dict())
    # fused Adam: one kernel for all parameters (about 3x faster than the default on a CPU)
    q_params = [p for qf in critics for p in qf.parameters()]
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True)
    action_scale = actor.action_scale
    bounds = tuple(torch.tensor(b, dtype=torch.float32).to(device) for b in (low, high))
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    learner = dict(actor=actor, actor_target=actor_target, q_optimizer=q_optimizer, rb=rb)
    learner.update({f"qf{i}": qf for i, qf in enumerate(critics, 1)})
    learner.update(actor_optimizer=actor_optimizer)
    learner.update({f"qf{i}_target": qf for i, qf in enumerate(critics_target, 1)})
    start_step = restore(checkpoint, learner) if checkpoint else 0
    env, obs = resume_episode(checkpoint, env, args.seed + start_step)
    loss_name = "TD3's loss" if args.critic_loss == "mse" else f"beta {args.beta} ({beta_source})"
    print(f"{SCRIPT}: {args.env_id}, {loss_name}, {n_critics} critic(s), {device}, runs/{run_name}")
    if checkpoint:
        print(f"resumed {args.resume} at step {start_step} of {args.total_timesteps}")
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    start_time = time.time()
    progress, last_return = Progress(args.total_timesteps, start_step), None
    logs = dict(actor_loss=torch.tensor(float("nan")))  # logged before the first actor update
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or global_step == args.stop_at:
            save_checkpoint(checkpoint_path, global_step, args, run_name, learner, (env, obs))
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            progress.print(f"stopped by {why} at step {global_step}; --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0]
                action = action + torch.randn_like(action) * action_scale * args.exploration_noise
            action = action.clamp(*bounds).cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # next_obs is the true last observation also at a truncation: the target bootstraps from it
        rb.add(obs, action, reward, next_obs, terminated)
        obs = next_obs
        if terminated or truncated:
            last_return = info["episode"]["r"]
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:
            logs.update(update(rb.sample(args.batch_size, device), learner, args, bounds,
                               global_step))
            if not torch.isfinite(logs["q_loss"]):
                sys.exit(f"error: the critic loss is not finite at step {global_step}: raise beta")
            if global_step % args.log_frequency == 0:
                check_values(logs["q_values"][0], rb.rewards[: rb.size], args.gamma, 0.0,
                             global_step)
                log_update(writer, logs, args, global_step, start_step, start_time)

        steps_done = global_step + 1
        if steps_done % args.eval_frequency == 0 or steps_done == args.total_timesteps:
            returns, q_estimate, discounted_return = evaluate_policy(
                actor, eval_env, args.eval_episodes, device, eval_seed, critics, args.gamma
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            # over-estimation shows as the critics' value of visited states above what they returned
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
        weights = {"actor": actor.state_dict(), "critics": [qf.state_dict() for qf in critics]}
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
        (args.beta is None or args.beta > 0, f"--beta must be > 0 (got {args.beta})"),
        (args.exp_clip > 0, f"--exp-clip must be > 0 (got {args.exp_clip}); the paper uses 8"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
        (min(args.batch_size, args.buffer_size, args.policy_frequency) >= 1,
         "--batch-size, --buffer-size and --policy-frequency must be positive"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")
    if args.capture_video:
        check_video_prerequisites(args.env_id)


def check_action_space(env_id: str, space: gym.Space) -> None:
    """The deterministic tanh policy needs a 1-D Box action space with finite bounds."""
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
        sys.exit(f"error: the values diverged at step {step} (mean |Q| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a larger --beta (X-TD3) or a smaller --learning-rate")


def log_update(writer, logs: dict, args: Args, step: int, start_step: int, start_time: float):
    """The losses and estimates of the last update, and the steps per second, to TensorBoard."""
    for i, (q, loss) in enumerate(zip(logs["q_values"], logs["q_losses"]), start=1):
        writer.add_scalar(f"losses/qf{i}_values", q.mean().item(), step)
        writer.add_scalar(f"losses/qf{i}_loss", loss.item(), step)
    writer.add_scalar("losses/qf_loss", logs["q_loss"].item() / len(logs["q_values"]), step)
    writer.add_scalar("losses/target_values", logs["y"].mean().item(), step)
    # the largest residual z of the batch: it explodes when X-TD3 goes unstable
    max_z = ((logs["y"] - logs["q_values"][0]) / args.beta).max().item()
    writer.add_scalar("losses/max_z", max_z, step)
    writer.add_scalar("losses/actor_loss", logs["actor_loss"].item(), step)
    writer.add_scalar("charts/SPS", int((step - start_step) / (time.time() - start_time)), step)

@torch.no_grad()
def evaluate_policy(actor, env, n_episodes: int, device, seed: int, critics=(), gamma=0.99):
    """Deterministic evaluation (no exploration noise): the returns of `n_episodes` episodes, and
    over every visited state the mean of min_i Q_i(s, a) against the mean discounted return from
    s (to the episode's end: short of the true value near a truncation); nan without `critics`."""
    returns, q_estimates, discounted, rewards = [], [], [], []
    obs, _ = env.reset(seed=seed)
    while len(returns) < n_episodes:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        action = actor(obs_t)
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
    for key, x in learner.items():  # networks, optimizers and the buffer
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
