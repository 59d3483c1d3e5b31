"""Offline Extreme Q-Learning (X-QL): a Gumbel-regressed V and advantage-weighted regression.

Garg, Hejna, Geist, Ermon, "Extreme Q-Learning: MaxEnt RL without Entropy", ICLR 2023, Sec. 3.5,
built the IQL way (Kostrikov et al. 2021). Docs: docs/xql_offline.md. One gradient step:

  V       V(s) <- min_i Q_bar_i(s, a), dataset actions     Gumbel loss E[exp(z) - z - 1], z clipped
  policy  max E[min(exp(eta (Q_bar(s, a) - V(s))), 100) ln pi(a|s)], dataset actions   AWR (Eq. 12)
  Q       Q_i(s, a) <- r + gamma (1 - terminated) V(s'), the V just updated            squared error
  Polyak  Q_bar_i <- (1 - lambda) Q_bar_i + lambda Q_i

With z = (y - V)/beta the Gumbel loss makes V a soft maximum beta ln E[exp(Q/beta)] over the data's
actions (Lemma 3.2): no out-of-distribution action is queried. `--value-loss expectile` is IQL's
expectile regression instead; `--eta 0` weighs every action 1, behaviour cloning. D4RL locomotion
rewards are scaled by 1000 / (max - min episode return). --dataset takes a D4RL-format HDF5 file,
a D4RL name read from D4RL's cache folder, or a Minari id; tools/ makes datasets.

    python xql_offline.py --dataset hopper-medium-v2
    python xql_offline.py --dataset data/hopper-good.hdf5 --value-loss expectile
"""

import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    dataset: str = "hopper-medium-v2"  # a D4RL-format .hdf5 file, a D4RL name or a Minari id
    env_id: str | None = None  # the evaluation env; inferred from the dataset when not given
    total_timesteps: int = 1000000  # gradient steps (offline: no env steps are taken to train)
    batch_size: int = 256  # the size of a batch sampled from the dataset
    gamma: float = 0.99  # the discount factor gamma
    lam: float = 0.005  # Polyak rate lambda of the target critics (CleanRL's `tau`)
    learning_rate: float = 3e-4  # of all networks (the policy's decays on a cosine to 0)
    hidden_size: int = 256  # width of the two hidden layers of every network
    value_loss: Literal["gumbel", "expectile"] = "gumbel"  # X-QL; `expectile`: IQL
    expectile: float = 0.7  # IQL's expectile of --value-loss expectile (IQL: 0.7 on locomotion)
    beta: float = 2.0  # Gumbel temperature (the paper: 2 on all locomotion, its 'X-QL C')
    eta: float = 3.0
    """AWR inverse temperature eta (the paper: 3; 0: BC); with random play in the data try 0.1"""
    exp_clip: float = 7.0  # upper clip of the Gumbel loss's residual z = (y - V)/beta (paper: 7)
    max_weight: float = 100.0  # cap of the AWR weights exp(eta * advantage)
    normalize_reward: bool = True
    """scale rewards by 1000 / (max - min episode return), as IQL and X-QL on D4RL locomotion"""
    reward_scale: float | None = None  # this scale of every reward, not --normalize-reward's

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 5000  # evaluate the policy's mean action every this many gradient steps
    eval_episodes: int = 10  # the number of episodes of each deterministic evaluation
    log_frequency: int = 1000  # log losses and SPS every this many gradient steps
    save_model: bool = False  # save the model into runs/{run_name}, then reload and evaluate it
    checkpoint_frequency: int = 0  # checkpoint every this many steps; 0: on SIGTERM, Ctrl-C only
    resume: str | None = None
    """continue the run of this checkpoint (or run folder); only
    --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None  # checkpoint and exit at this step (a chunk of a longer run)
    eval_model: str | None = None  # evaluate this saved model or checkpoint, and exit
    capture_video: bool = False  # videos of the evaluation episodes into videos/ (needs moviepy)
    track: bool = False  # track the run with Weights and Biases (needs wandb)
    wandb_project_name: str = "entropy-rl"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project


def make_env(env_id, seed, env_kwargs=None, capture_video=False, videos=None, minari=None, every=1):
    """The evaluation env: a gymnasium id with its kwargs, or a Minari dataset's recorded env."""
    render_mode = "rgb_array" if capture_video else None
    if minari is not None and env_id is None:
        env = minari.recover_environment(eval_env=True, render_mode=render_mode)
    else:
        env = gym.make(env_id, render_mode=render_mode, **(env_kwargs or {}))
    if capture_video:  # the first episode of every evaluation
        env = gym.wrappers.RecordVideo(env, videos, episode_trigger=lambda i: i % every == 0)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def mlp(in_dim: int, out_dim: int, hidden: int, layer_norm: bool = False) -> nn.Sequential:
    norm = (lambda: nn.LayerNorm(hidden)) if layer_norm else nn.Identity
    layers = [nn.Linear(in_dim, hidden), norm(), nn.ReLU(), nn.Linear(hidden, hidden), norm()]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden, out_dim))


class Critic(nn.Module):
    """A scalar of the concatenated inputs: V(s) (with LayerNorm, as the paper's V) or Q(s, a)."""

    def __init__(self, in_dim: int, hidden: int, layer_norm: bool = False):
        super().__init__()
        self.net = mlp(in_dim, 1, hidden, layer_norm)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1)).squeeze(-1)


class GaussianPolicy(nn.Module):
    """IQL's policy: Gaussian, the mean tanh-squashed into the bounds, a free log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, low, high, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, len(low), hidden)
        self.log_std = nn.Parameter(torch.zeros(len(low)))
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (low, high))
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action, used for evaluation."""
        return torch.tanh(self.net(obs)) * self.action_scale + self.action_bias

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self(obs), std).log_prob(actions).sum(-1)


def gumbel_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float | None):
    """Gumbel regression (Eq. 7/11) of `pred` on `target`, in the stable form of App. D.3: with
    z = (target - pred)/beta the loss is mean(exp(z) - z - 1), minimised by a constant pred at
    beta ln mean exp(target/beta) (Lemma 3.2); computed as exp(-m) (exp(z) - z - 1), m = max(z)
    floored at -1 and detached: one positive factor per batch, the same minimiser, bounded terms.
    z is first clipped from above at `clip`, as in the authors' offline code."""
    z = (target - pred) / beta
    z = z.clamp(max=clip) if clip is not None else z
    m = z.max().detach().clamp(min=-1.0)
    return (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()


def expectile_loss(pred: torch.Tensor, target: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's expectile regression (Kostrikov et al. 2021, Eq. 5): mean(|e - 1(u < 0)| u^2) with
    u = target - pred, minimised over a constant pred at the e-expectile of the targets."""
    u = target - pred
    return (torch.abs(expectile - (u < 0).float()) * u.pow(2)).mean()


def value_loss_fn(v, q, value_loss: str, beta: float, clip: float, expectile: float):
    """V's loss: X-QL's Gumbel regression (Eq. 11) or IQL's expectile regression."""
    if value_loss == "expectile":
        return expectile_loss(v, q, expectile)
    return gumbel_loss(v, q, beta, clip)


def awr_weights(q: torch.Tensor, v: torch.Tensor, eta: float, max_weight: float) -> torch.Tensor:
    """Eq. 12's advantage weights min(exp(eta (Q(s, a) - V(s))), max_weight), detached."""
    return torch.exp(eta * (q - v)).clamp(max=max_weight).detach()


def awr_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 12: -E[w ln pi(a|s)] on dataset actions."""
    return -(weights * log_prob).mean()


def critic_target(rewards, dones, v_next, gamma: float):
    """r + gamma (1 - terminated) V(s'), with the V just updated (no target V; Sec. 3.5, as IQL);
    time-outs bootstrap."""
    return rewards + gamma * (1.0 - dones) * v_next


def critic_loss(q_values, y):
    """The critics' squared error to y, summed over the critics. The authors' code uses a Huber loss
    (delta 20); the paper says squared error, which we use."""
    return sum((q - y).pow(2).mean() for q in q_values)


def polyak(target: nn.Module, online: nn.Module, lam: float) -> None:
    """theta_bar <- (1 - lam) theta_bar + lam theta."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.lerp_(p, lam)


def update(batch, learner: dict, args: Args) -> dict:
    """One gradient step on a batch: V on the Polyak critics, the policy on the advantage
    against the V just updated, the critics on that V's targets, then their Polyak averages (IQL's
    order). Returns the losses and estimates to log, detached."""
    b_obs, b_actions, b_rewards, b_next_obs, b_dones = batch
    vf, policy = learner["vf"], learner["policy"]
    critics = [learner["qf1"], learner["qf2"]]
    critics_target = [learner["qf1_target"], learner["qf2_target"]]
    with torch.no_grad():
        q_bar = torch.min(*[qf_target(b_obs, b_actions) for qf_target in critics_target])
    v = vf(b_obs)
    v_loss = value_loss_fn(v, q_bar, args.value_loss, args.beta, args.exp_clip, args.expectile)
    learner["v_optimizer"].zero_grad(set_to_none=True)
    v_loss.backward()
    learner["v_optimizer"].step()

    with torch.no_grad():  # the advantage against the V just updated
        weights = awr_weights(q_bar, vf(b_obs), args.eta, args.max_weight)
    policy_loss = awr_loss(policy.log_prob(b_obs, b_actions), weights)
    learner["policy_optimizer"].zero_grad(set_to_none=True)
    policy_loss.backward()
    learner["policy_optimizer"].step()
    learner["policy_lr_schedule"].step()

    with torch.no_grad():
        y = critic_target(b_rewards, b_dones, vf(b_next_obs), args.gamma)
    q_values = [qf(b_obs, b_actions) for qf in critics]
    q_loss = critic_loss(q_values, y)
    learner["q_optimizer"].zero_grad(set_to_none=True)
    q_loss.backward()
    learner["q_optimizer"].step()
    for qf_target, qf in zip(critics_target, critics):
        polyak(qf_target, qf, args.lam)
    return dict(q_bar=q_bar, v=v.detach(), value_loss=v_loss.detach(), weights=weights, y=y,
                policy_loss=policy_loss.detach(), q_values=[q.detach() for q in q_values],
                q_loss=q_loss.detach())

def train(args: Args) -> None:
    args, run, D = start_run(args)  # --eval-model; resume, checks, data, env, writer...: appendix
    device, n_data = run.device, len(D["rewards"])
    obs_dim, act_dim = D["observations"].shape[1], D["actions"].shape[1]
    low, high = run.env.action_space.low, run.env.action_space.high
    policy = GaussianPolicy(obs_dim, low, high, args.hidden_size).to(device)
    vf = Critic(obs_dim, args.hidden_size, layer_norm=True).to(device)  # as the authors' V
    q_in = obs_dim + act_dim
    qfs = [Critic(q_in, args.hidden_size).to(device) for _ in range(4)]
    critics, critics_target = qfs[:2], qfs[2:]  # two critics, then their Polyak averages
    for qf, qf_target in zip(critics, critics_target):
        qf_target.load_state_dict(qf.state_dict())
    # fused Adam: one kernel for all parameters
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.learning_rate, fused=True)
    q_params = [p for qf in critics for p in qf.parameters()]
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, fused=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR
    policy_lr_schedule = cosine(policy_optimizer, args.total_timesteps)
    learner = dict(policy=policy, vf=vf, v_optimizer=v_optimizer, q_optimizer=q_optimizer)
    learner.update(policy_optimizer=policy_optimizer, policy_lr_schedule=policy_lr_schedule)
    learner.update({f"qf{i}": qf for i, qf in enumerate(critics, 1)})
    learner.update({f"qf{i}_target": qf for i, qf in enumerate(critics_target, 1)})
    run.restore(learner)  # a checkpoint's learner and random states
    policy_lr_schedule.T_max = args.total_timesteps  # on resume, the cosine stretched to a new end
    keys = ("observations", "actions", "rewards", "next_observations", "dones")
    for global_step in range(run.start_step, args.total_timesteps):  # gradient steps
        run.stop_if_asked(global_step, learner)  # SIGTERM, Ctrl-C, --stop-at: checkpoint, exit
        idx = torch.randint(0, n_data, (args.batch_size,), device=device)
        logs = update(tuple(D[k][idx] for k in keys), learner, args)
        if global_step % args.log_frequency == 0:  # stops a diverging run
            log_update(run, logs, D, idx, learner, args, global_step)
        if run.evaluation_due(global_step + 1):  # the policy's mean action
            run.evaluate(global_step, policy)
        run.step_done(global_step + 1, learner)  # periodic checkpoint, progress line
    run.finish({"policy": policy.state_dict(), "vf": vf.state_dict(),
                "critics": [qf.state_dict() for qf in critics]})


# ---------------------------------------------------------------------------------------------
# Appendix: input checks, datasets, evaluation, logging and checkpoints
# ---------------------------------------------------------------------------------------------
def check_args(args: Args, checkpoint: dict | None = None) -> None:
    """Stop with a one-line error naming the fix, before anything is loaded."""
    step = checkpoint["global_step"] if checkpoint else 0
    for ok, msg in [
        (0 < args.gamma < 1, f"--gamma must be in (0, 1) (got {args.gamma}); 0.99 is usual"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1 (got {args.eval_episodes})"),
        (args.seed >= 0, f"--seed must be >= 0 (got {args.seed}): NumPy takes seeds in [0, 2**32)"),
        (args.learning_rate > 0, "--learning-rate must be > 0"),
        (not args.track or find_spec("wandb"), "--track needs wandb: pip install wandb"),
        (args.total_timesteps >= 1, f"--total-timesteps must be >= 1 (got {args.total_timesteps})"),
        (step < args.total_timesteps,
         f"the run in {args.resume} is complete ({step} steps); extend it with --total-timesteps"),
        (args.beta > 0, f"--beta must be > 0 (got {args.beta}); the paper uses 2 on locomotion"),
        (0 < args.expectile < 1, f"--expectile must be in (0, 1) (got {args.expectile}); IQL: 0.7"),
        (args.exp_clip > 0, f"--exp-clip must be > 0 (got {args.exp_clip}); the paper uses 7"),
        (args.eta >= 0, f"--eta must be >= 0 (got {args.eta}); 0 is behaviour cloning"),
        (args.max_weight > 0, f"--max-weight must be > 0 (got {args.max_weight}); IQL uses 100"),
        (args.reward_scale is None or args.reward_scale > 0,
         f"--reward-scale must be > 0 (got {args.reward_scale}); leave it out to derive it"),
        (min(args.batch_size, args.eval_frequency) >= 1,
         "--batch-size and --eval-frequency must be >= 1"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")


# D4RL's reference returns (d4rl/infos.py): (random, expert) -> normalised scores 0 and 100
D4RL_REF_SCORES = dict(hopper=(-20.272305, 3234.3), halfcheetah=(-280.178953, 12135.0),
                       walker2d=(1.629008, 4592.3), ant=(-325.6, 3879.7))  # fmt: skip
# the gymnasium env of each D4RL robot, with D4RL's observation layout (ant: 111-d, contact forces)
D4RL_ENVS = {"hopper": ("Hopper-v5", {}), "halfcheetah": ("HalfCheetah-v5", {})}
D4RL_ENVS.update(walker2d=("Walker2d-v5", {}), ant=("Ant-v4", {"use_contact_forces": True}))
def start_run(args: Args) -> tuple[Args, "Run", dict]:
    """The run's set-up before any network: --eval-model evaluates and exits here; else the flags
    of a checkpoint with --resume, the checks, the dataset (on the device, rewards scaled), the
    eval env and a Run (signals, writer, seeds...)."""
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", args.capture_video)
        print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    meta = load_dataset(args.dataset)
    data = qlearning_dataset(meta["raw"], args.gamma)
    env_id = args.env_id or meta["env_id"]
    if env_id is None and "eval_env" not in meta:
        sys.exit(f"error: cannot infer the evaluation env of {args.dataset}; pass --env-id")
    env_kwargs = meta["env_kwargs"] if args.env_id is None else {}
    name = f"{dataset_name(args.dataset)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    name = checkpoint["run_name"] if checkpoint else name
    if args.capture_video and env_id is not None:
        check_video_prerequisites(env_id)
    env = make_env(env_id, args.seed, env_kwargs, args.capture_video, f"videos/{name}",
                   meta.get("eval_env"), args.eval_episodes)
    env_name = env_id or env.spec.id
    check_env_matches(env, env_name, data)
    r = episode_returns(meta["raw"])
    span = r.max() - r.min()  # the same data, any file: the same scale
    reward_scale = args.reward_scale or (1000.0 / max(span, 1e-8) if args.normalize_reward else 1.0)
    env_spec = {"env_id": env_id, "env_kwargs": env_kwargs}  # env_id None: the Minari dataset's own
    run = Run(args, checkpoint, name, env, env_spec, meta["ref_scores"])
    # the whole dataset sits on the device as tensors: a batch is one index operation
    D = {k: torch.as_tensor(v, device=run.device) for k, v in data.items()}
    D["rewards"] = D["rewards"] * reward_scale
    D["returns_to_go"] = D["returns_to_go"] * reward_scale  # a diagnostic for V, not a target
    loss = f"beta {args.beta}" if args.value_loss == "gumbel" else f"expectile {args.expectile}"
    # printed by Run.restore, just before the loop
    run.banner = (
        f"{SCRIPT}: {args.dataset}, {len(D['rewards'])} transitions, {len(r)} trajectories of "
        f"return {r.mean():.1f} ({r.min():.1f} to {r.max():.1f}), reward scale "
        f"{reward_scale:.4g}; eval env {env_name}; {loss}, eta {args.eta}; {run.device}; "
        f"runs/{run.name}"
    )
    return args, run, D


def log_update(run: "Run", logs: dict, D: dict, idx, learner: dict, args: Args, step: int):
    """Stop a run whose losses are not finite or whose values run away; log the losses and
    estimates of the last update, and the policy's learning rate."""
    if not torch.isfinite(logs["value_loss"] + logs["q_loss"] + logs["policy_loss"]):
        sys.exit(f"error: a loss is not finite at step {step}; try a larger --beta")
    check_values(logs["v"], D["rewards"], args.gamma, 0.0, step)
    # V read against the same states' discounted return in the data shows over-estimation
    weights = logs["weights"]
    scalars = dict(value_loss=logs["value_loss"], qf_loss=logs["q_loss"] / 2,
                   policy_loss=logs["policy_loss"],
                   v_values=logs["v"].mean(), data_discounted_return=D["returns_to_go"][idx].mean(),
                   qf1_values=logs["q_values"][0].mean(), awr_weights_mean=weights.mean(),
                   awr_weights_capped_frac=(weights >= args.max_weight).float().mean())
    if args.value_loss == "gumbel":
        scalars["max_z"] = ((logs["q_bar"] - logs["v"]) / args.beta).max()
    run.writer.add_scalar("charts/policy_learning_rate",
                          learner["policy_optimizer"].param_groups[0]["lr"], step)
    run.log(scalars, step)


KINDS = "random|medium|expert|medium-replay|medium-expert|full-replay"
D4RL_NAME = re.compile(rf"^(hopper|halfcheetah|walker2d|ant)-({KINDS})-v(\d)$")
D4RL_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def read_d4rl_hdf5(path: str) -> tuple[dict, dict]:
    """The arrays and attributes of a D4RL-format HDF5 file, after checking its keys."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: dataset file {path} does not exist (tools/ makes datasets)")
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:  # empty, or a half-downloaded or text file
        raise SystemExit(f"error: {path} is not an HDF5 file (empty or cut short?)") from None
    with f:
        missing = [k for k in D4RL_REQUIRED_KEYS if k not in f]
        if missing:
            raise SystemExit(
                f"error: {path} lacks the D4RL keys {missing}; a D4RL file "
                f"needs {list(D4RL_REQUIRED_KEYS)} and optionally next_observations"
            )
        raw = {k: f[k][()] for k in (*D4RL_REQUIRED_KEYS, "next_observations") if k in f}
        attrs = dict(f.attrs)
    n = len(raw["rewards"])
    if any(len(v) != n for v in raw.values()):
        lengths = [(k, len(v)) for k, v in raw.items()]
        raise SystemExit(f"error: {path}: its arrays have different lengths {lengths}")
    return raw, attrs


def returns_to_go(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma G_{t+1} within each trajectory (ends[t] marks its last row): the discounted
    return the data's own actions obtained from each state. Cut short at time-outs, so there it
    underestimates the value; a diagnostic for V, never a training target."""
    g, out = 0.0, np.zeros(len(rewards), dtype=np.float64)
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + (0.0 if ends[t] else gamma * g)
        out[t] = g
    return out.astype(np.float32)


def qlearning_dataset(raw: dict, gamma: float = 0.99) -> dict:
    """D4RL flat arrays -> transitions (observations, actions, rewards, next_observations, dones),
    like d4rl.qlearning_dataset but never pairing the end of one trajectory with the next's start;
    plus each transition's discounted return to the end of its trajectory (`returns_to_go`)."""
    obs = np.asarray(raw["observations"], dtype=np.float32)
    terminals = np.asarray(raw["terminals"], dtype=bool).reshape(-1)
    timeouts = np.asarray(raw["timeouts"], dtype=bool).reshape(-1)
    if "next_observations" in raw:
        next_obs = np.asarray(raw["next_observations"], dtype=np.float32)
        keep = np.ones(len(obs), dtype=bool)  # a time-out bootstraps from its true next observation
    else:
        next_obs = np.concatenate([obs[1:], obs[-1:]])
        last = np.arange(len(obs)) == len(obs) - 1
        keep = ~((timeouts | last) & ~terminals)  # no true next observation: drop (as d4rl does)
        next_obs = np.where(terminals[:, None], obs, next_obs)  # unused: done = 1
    rewards = np.asarray(raw["rewards"], dtype=np.float32).reshape(-1)
    ends = terminals | timeouts
    ends[-1] = True
    return {
        "observations": obs[keep],
        "actions": np.asarray(raw["actions"], dtype=np.float32)[keep],
        "rewards": rewards[keep],
        "next_observations": next_obs[keep],
        "dones": terminals[keep].astype(np.float32),
        "returns_to_go": returns_to_go(rewards, ends, gamma)[keep],
    }


def episode_returns(raw: dict) -> np.ndarray:
    """Returns of the trajectories in D4RL flat arrays (ending at terminals, time-outs, the end)."""
    ends = np.asarray(raw["terminals"], dtype=bool).reshape(-1)
    ends = ends | np.asarray(raw["timeouts"], dtype=bool).reshape(-1)
    ends[-1] = True
    episode_id = np.concatenate([[0], np.cumsum(ends)[:-1]])
    return np.bincount(episode_id, weights=np.asarray(raw["rewards"], dtype=np.float64).reshape(-1))


def minari_to_d4rl(dataset) -> dict:
    """A Minari dataset's episodes as D4RL flat arrays (with next_observations)."""
    eps = list(dataset.iterate_episodes())
    if any(isinstance(ep.observations, dict) for ep in eps):
        raise SystemExit("error: the Minari dataset's observations are dicts; this needs arrays")
    parts = dict(observations=[e.observations[:-1] for e in eps], actions=[e.actions for e in eps])
    parts.update(rewards=[e.rewards for e in eps], terminals=[e.terminations for e in eps])
    parts.update(timeouts=[e.truncations for e in eps])
    parts.update(next_observations=[e.observations[1:] for e in eps])
    return {k: np.concatenate(v) for k, v in parts.items()}


def d4rl_file(name: str) -> tuple[str, str]:
    """D4RL's server folder and file name of a locomotion dataset. -v0 files carry no version and
    medium-replay-v0 is "mixed" (walker2d's is walker_mixed.hdf5); -v1 and -v2 are named
    robot_kind-vN.hdf5 under gym_mujoco_v1/ and gym_mujoco_v2/."""
    robot, kind, version = D4RL_NAME.match(name).groups()
    if version == "0":
        if kind == "full-replay":
            raise SystemExit(f"error: {name}: D4RL has no full-replay-v0: {robot}-full-replay-v2")
        if kind == "medium-replay":
            return "gym_mujoco", f"{'walker' if robot == 'walker2d' else robot}_mixed.hdf5"
        return "gym_mujoco", f"{robot}_{kind.replace('-', '_')}.hdf5"
    if version not in ("1", "2"):
        raise SystemExit(f"error: {name}: D4RL's locomotion datasets are -v0, -v1 and -v2")
    return f"gym_mujoco_v{version}", f"{robot}_{kind.replace('-', '_')}-v{version}.hdf5"


def load_dataset(spec: str) -> dict:
    """Resolve --dataset into D4RL flat arrays plus what the run needs to know about them:
    {"raw", "env_id", "env_kwargs", "ref_scores", "eval_env" (Minari only)}."""
    if spec.endswith((".hdf5", ".h5")) or os.path.isfile(spec):
        raw, attrs = read_d4rl_hdf5(spec)
        robot = next((r for r in D4RL_ENVS if os.path.basename(spec).lower().startswith(r)), None)
        env_id, env_kwargs = D4RL_ENVS[robot] if robot else (attrs.get("env_id"), {})
        ref = D4RL_REF_SCORES.get(robot)
        if "ref_min_score" in attrs and "ref_max_score" in attrs:
            ref = (float(attrs["ref_min_score"]), float(attrs["ref_max_score"]))
        return {"raw": raw, "env_id": env_id, "env_kwargs": env_kwargs, "ref_scores": ref}
    if D4RL_NAME.match(spec):
        robot = D4RL_NAME.match(spec).group(1)
        env_id, env_kwargs = D4RL_ENVS[robot]
        meta = dict(env_id=env_id, env_kwargs=env_kwargs, ref_scores=D4RL_REF_SCORES[robot])
        folder, file = d4rl_file(spec)  # where D4RL keeps it: $D4RL_DATASET_DIR or ~/.d4rl/datasets
        cache = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
        path = os.path.join(cache, file)
        if not os.path.isfile(path):
            raise SystemExit(
                f"error: {spec} is not on this machine; download "
                f"http://rail.eecs.berkeley.edu/datasets/offline_rl/{folder}/{file} "
                f"to {path} (or pass --dataset /path/to/file.hdf5)"
            )
        return {"raw": read_d4rl_hdf5(path)[0], **meta}
    if "/" in spec:
        try:
            import minari
        except ImportError:
            raise SystemExit(
                f'error: {spec} looks like a Minari id: pip install "minari[hdf5]"'
            ) from None
        try:
            dataset = minari.load_dataset(spec)
        except FileNotFoundError:
            raise SystemExit(
                f"error: the Minari dataset {spec} is not in the local Minari folder; run "
                f"`minari download {spec}` (or set MINARI_DATASETS_PATH)"
            ) from None
        meta = dataset.storage.metadata
        refs = (meta.get("ref_min_score"), meta.get("ref_max_score"))
        ref = tuple(map(float, refs)) if None not in refs else None
        return {"raw": minari_to_d4rl(dataset), "env_id": None, "env_kwargs": {}, "ref_scores": ref,
                "eval_env": dataset}  # fmt: skip
    raise SystemExit(
        f"error: --dataset {spec!r} is neither an .hdf5 file, a D4RL locomotion name like "
        "hopper-medium-v2, nor a Minari id like mujoco/hopper/medium-v0"
    )


def dataset_name(spec: str) -> str:
    """The dataset in run names: a file's name without folder or extension, a Minari id with '-'."""
    if spec.endswith((".hdf5", ".h5")) or os.path.isfile(spec):
        return os.path.splitext(os.path.basename(spec))[0]
    return spec.replace("/", "-")


def check_video_prerequisites(env_id: str) -> None:
    """--capture-video needs moviepy and a renderer (MUJOCO_GL=egl or osmesa without a display)."""
    try:
        import moviepy  # noqa: F401

        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except ImportError as exc:
        sys.exit(f"error: --capture-video needs {exc.name}: pip install {exc.name}")
    except Exception as exc:  # pygame missing, or no OpenGL context (mujoco.FatalError)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.exit(f"error: --capture-video could not render {env_id} ({msg}); try MUJOCO_GL=egl")


def check_env_matches(env: gym.Env, env_name: str, data: dict) -> None:
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        sys.exit(f"error: {env_name} has action space {space}: not a 1-D continuous Box")
    obs_shape, act_shape = data["observations"].shape[1:], data["actions"].shape[1:]
    if env.observation_space.shape != obs_shape or space.shape != act_shape:
        sys.exit(
            f"error: the dataset has observations {obs_shape} and actions {act_shape}, but "
            f"{env_name} has {env.observation_space.shape} and {space.shape}: pass its --env-id"
        )


def normalized_score(returns, ref_min: float, ref_max: float):
    """D4RL's normalised score 100 (R - R_random) / (R_expert - R_random)."""
    return 100.0 * (np.asarray(returns) - ref_min) / (ref_max - ref_min)


def check_values(values, rewards, gamma: float, bonus: float, step: int) -> None:
    """Stop a run whose values run away with finite losses: mean |values| over ten times
    (max |r| + bonus)/(1 - gamma), the largest discounted return; bonus: a step's entropy term."""
    bound = (rewards.abs().max().item() + bonus) / max(1.0 - gamma, 1e-8)
    if 0 < 10 * bound < (mean := values.abs().mean().item()):
        sys.exit(f"error: the values diverged at step {step} (mean |V| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a larger --beta or a smaller --learning-rate")


@torch.no_grad()
def evaluate_policy(policy: GaussianPolicy, env: gym.Env, n_episodes: int, device, seed: int):
    """Returns of `n_episodes` episodes acting with the policy's mean action."""
    returns = []
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    while len(returns) < n_episodes:
        action = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0]
        obs, _, terminated, truncated, info = env.step(np.clip(action.cpu().numpy(), low, high))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            obs, _ = env.reset()
    return np.array(returns)


def evaluate(path: str, eval_episodes=10, seed=0, device="cpu", capture_video=False) -> np.ndarray:
    """Evaluation returns of a saved model or checkpoint, on the env it names (a gymnasium id with
    its kwargs, or the Minari dataset's own eval env)."""
    saved = load_checkpoint(path, "--eval-model")
    env_id, minari_data = saved["env_id"], None
    if env_id is None:
        import minari

        minari_data = minari.load_dataset(saved["args"]["dataset"])
    elif capture_video:
        check_video_prerequisites(env_id)
    env = make_env(env_id, seed, saved["env_kwargs"], capture_video, "videos/eval", minari_data,
                   eval_episodes)
    space, hidden = env.action_space, saved["args"]["hidden_size"]
    policy = GaussianPolicy(env.observation_space.shape[0], space.low, space.high, hidden)
    policy.load_state_dict(saved["policy"])
    return evaluate_policy(policy.to(device), env, eval_episodes, torch.device(device), seed)


class Run:
    """The run-keeping half of train(): the run's stop signals, writer and seeds, then its
    checkpoints, update and evaluation logs, the progress line and the saved model."""

    def __init__(self, args: Args, checkpoint: dict | None, name: str, env: gym.Env, env_spec: dict,
                 ref_scores):  # fmt: skip
        self.args, self.checkpoint, self.name, self.env = args, checkpoint, name, env
        self.env_spec = env_spec  # the eval env as a saved model's evaluation makes it again
        self.ref_scores, self.path = ref_scores, f"runs/{name}/checkpoint.pt"
        self.signals = []  # SIGTERM (a job's time limit) or Ctrl-C: checkpoint, then exit
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda sig, frame: self.signals.append(sig))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                       sync_tensorboard=True, name=name, save_code=True)  # fmt: skip
        # a resumed run logs into its folder, hiding what the stopped run logged from its step on
        purge_step = checkpoint["global_step"] if checkpoint else None
        self.writer = SummaryWriter(f"runs/{name}", purge_step=purge_step)
        if not checkpoint:
            table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.start_step, self.last_return = 0, None

    def restore(self, learner: dict) -> None:
        """Load a checkpoint's learner (networks, optimizers, schedule) and random states."""
        print(self.banner)
        if ckpt := self.checkpoint:
            for key, x in learner.items():
                x.load_state_dict(ckpt[key])
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.start_step = ckpt["global_step"]
            total = self.args.total_timesteps
            print(f"resumed {self.args.resume} at step {self.start_step} of {total}")
        self.progress = Progress(self.args.total_timesteps, self.start_step)
        self.start_time = time.time()

    def save(self, step: int, learner: dict) -> None:
        """The learner before step `step` and the random states (the data is read again on resume);
        written to a temporary file, then renamed: a kill mid-write leaves the last one whole."""
        rng = dict(python=random.getstate(), numpy=np.random.get_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        rng.update(torch=torch.get_rng_state(), cuda=cuda)
        state = {k: x.state_dict() for k, x in learner.items()}
        meta = dict(script=SCRIPT, args=vars(self.args), run_name=self.name, global_step=step)
        torch.save({**meta, "rng": rng, **state, **self.env_spec}, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def stop_if_asked(self, step: int, learner: dict) -> None:
        if self.signals or step == self.args.stop_at:  # checkpoint as before `step`, and exit
            self.save(step, learner)
            why = f"signal {self.signals[0]}" if self.signals else "--stop-at"
            self.progress.print(f"stopped by {why} at step {step}; --resume {self.path}")
            sys.exit(128 + self.signals[0] if self.signals else 0)

    def log(self, scalars: dict, step: int) -> None:  # an update's losses and estimates, and SPS
        for tag, value in scalars.items():
            self.writer.add_scalar(f"losses/{tag}", value, step)
        self.writer.add_scalar("charts/SPS", self.sps(step), step)

    def sps(self, steps: int) -> int:
        return int((steps - self.start_step) / (time.time() - self.start_time))

    def evaluation_due(self, steps: int) -> bool:
        return steps % self.args.eval_frequency == 0 or steps == self.args.total_timesteps

    def evaluate(self, step: int, policy) -> None:
        """Evaluate the policy's mean action; log the return and, for D4RL data, the score."""
        args = self.args
        returns = evaluate_policy(policy, self.env, args.eval_episodes, self.device,
                                  args.seed + 10_000)
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.last_return = returns.mean()
        line = f"step {step + 1}: eval return {returns.mean():.1f}"
        if self.ref_scores is not None:
            score = normalized_score(returns, *self.ref_scores)
            self.writer.add_scalar("eval/normalized_score", score.mean(), step)
            line += f", normalized score {score.mean():.1f}"
        self.progress.print(f"{line}, SPS {self.sps(step + 1)}")

    def step_done(self, steps: int, learner: dict) -> None:
        every, end = self.args.checkpoint_frequency, steps == self.args.total_timesteps
        if every and (steps % every == 0 or end):
            self.save(steps, learner)
        self.progress.update(steps, self.last_return)

    def finish(self, state_dicts: dict) -> None:
        """End the progress line; with --save-model, save the networks, reload and evaluate them."""
        self.progress.print()
        if (args := self.args).save_model:
            path = f"runs/{self.name}/{args.exp_name}.cleanrl_model"
            torch.save({"script": SCRIPT, "args": vars(args), **state_dicts, **self.env_spec}, path)
            returns = evaluate(path, args.eval_episodes, args.seed + 20_000, str(self.device))
            for idx, episodic_return in enumerate(returns):
                self.writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
            print(f"model saved to {path}; reloaded: eval return {returns.mean():.1f}")
        self.env.close()
        self.writer.close()


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
