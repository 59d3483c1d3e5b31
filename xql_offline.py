"""Offline Extreme Q-Learning (X-QL) on D4RL-style datasets, single file.

Paper: Garg, Hejna, Geist, Ermon, "Extreme Q-Learning: MaxEnt RL without Entropy", ICLR 2023,
Section 3.5 (offline), built the IQL way (Kostrikov et al. 2021). Docs: docs/xql_offline.md.

Gumbel regression (Eq. 7/11): for a prediction p of a target y and a temperature beta,
z = (y - p)/beta and L(z) = exp(z) - z - 1, minimised over a constant p at
p* = beta * ln E[exp(y/beta)] (Lemma 3.2). Offline, the expectation is over the *dataset's*
actions, so V becomes a soft maximum of Q over the behaviour policy's support (a KL-regularised
value, no out-of-distribution action is ever queried). One gradient step does, in this order:

  V      V(s)    <- min_i Q_bar_i(s, a)  at dataset actions      Gumbel loss (z clipped from above at c)
  policy max E[min(exp(eta * (Q_bar(s, a) - V(s))), 100) * ln pi(a|s)]   AWR on dataset actions (Eq. 12)
  Q      Q_i(s, a) <- r + gamma * (1 - done) * V(s')             squared error, the V just updated
  Polyak lambda = 0.005 on the critics (V has no target network)

`--value-loss expectile` swaps the Gumbel loss for IQL's expectile regression (tau = 0.7), the rest
unchanged, so that X-QL and IQL compare from one file.

eta = 3 is the authors' inverse temperature on locomotion, separate from beta (Eq. 12 itself
implies eta = 1/beta); eta = 0 gives every action weight 1, i.e. behaviour cloning. The policy
is a Gaussian with a tanh-squashed mean and a state-independent log-std clipped to [-5, 2];
evaluation uses the mean. V has LayerNorm; the policy's learning rate decays on a cosine.
D4RL locomotion rewards are scaled by 1000 / (max episode return - min episode return).
The authors' code regresses Q with a Huber loss (delta 20); the paper says squared error, which
we use.

Datasets (`--dataset`), read without the d4rl package (it needs gym < 0.25 and mujoco-py):
  * a D4RL-format HDF5 file (observations, actions, rewards, terminals, timeouts, optional
    next_observations), turned into transitions like d4rl.qlearning_dataset, except that no
    transition pairs the end of one trajectory with the start of the next: with
    next_observations a time-out transition is kept and bootstraps from its true next
    observation; without them it is dropped (as d4rl does), and a terminal transition's next
    observation, never used since done = 1, is set to its own observation.
  * a D4RL name such as hopper-medium-v2: the d4rl package if it is installed, else the file in
    D4RL's cache folder ($D4RL_DATASET_DIR or ~/.d4rl/datasets), else a message naming the file
    to download and where to put it.
  * a Minari dataset id such as mujoco/hopper/medium-v0, loaded from the local Minari folder.
The evaluation env is inferred from the dataset (D4RL locomotion: the gymnasium MuJoCo env of
the same robot with D4RL's observation layout; Minari: its recorded eval env; our own HDF5
files: their env_id attribute); --env-id overrides it. Note that gymnasium's MuJoCo v5 envs run
on the mujoco bindings, not D4RL's mujoco-py, so scores are close to but not the same task.
Scores: D4RL's normalised score 100 * (R - R_random) / (R_expert - R_random), with D4RL's
reference returns for D4RL data and the stored reference scores of Minari or our own files.
`tools/make_offline_dataset.py` makes a dataset offline from rollouts of any policy.

Usage:
    python xql_offline.py --dataset hopper-medium-v2
    python xql_offline.py --dataset hopper-medium-v2 --beta 5          # the paper's tuned beta
    python xql_offline.py --dataset path/to/file.hdf5 --env-id Hopper-v5
    python xql_offline.py --dataset mujoco/hopper/medium-v0
"""

import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
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
    dataset: str = "hopper-medium-v2"
    """a D4RL-format .hdf5 path, a D4RL name (hopper-medium-v2), or a Minari id (mujoco/hopper/medium-v0)"""
    env_id: str | None = None
    """the evaluation env; inferred from the dataset when not given"""
    total_timesteps: int = 1000000
    """number of gradient steps (offline: no environment steps are taken for training)"""
    batch_size: int = 256
    """the batch size of sample from the dataset"""
    gamma: float = 0.99
    """the discount factor gamma"""
    lam: float = 0.005
    """Polyak rate lambda of the target critics"""
    learning_rate: float = 3e-4
    """the learning rate of all networks (the policy's decays on a cosine to 0)"""
    hidden_size: int = 256
    """width of the two hidden layers of every network"""
    value_loss: Literal["gumbel", "expectile"] = "gumbel"
    """`gumbel`: X-QL (Gumbel regression of V on Q); `expectile`: IQL (expectile regression, --expectile)"""
    expectile: float = 0.7
    """IQL's expectile of --value-loss expectile (IQL: 0.7 on locomotion)"""
    beta: float = 2.0
    """the Gumbel regression temperature beta (paper: 2 on all locomotion, 'X-QL C'; tuned per dataset in docs/xql_offline.md)"""
    eta: float = 3.0
    """AWR inverse temperature eta (paper: 3; 0: behaviour cloning); on data mixed with random play try 0.1
    (docs/xql_offline.md: the critic's error on those rows takes over the capped weights)"""
    exp_clip: float = 7.0
    """clip from above of the normalised residual z = (y - V)/beta in the Gumbel loss (paper: 7; 5 on some)"""
    max_weight: float = 100.0
    """cap of the AWR weights exp(eta * advantage)"""
    normalize_reward: bool = True
    """scale rewards by 1000 / (max - min episode return), D4RL locomotion preprocessing of IQL/X-QL"""
    reward_scale: float | None = None
    """multiply every reward by this instead of the scale --normalize-reward derives (printed at start)"""
    eval_frequency: int = 5000
    """evaluate the policy's mean action every this many gradient steps"""
    eval_episodes: int = 10
    """the number of episodes of each evaluation"""
    log_frequency: int = 1000
    """log losses and SPS every this many gradient steps"""
    checkpoint_frequency: int = 0
    """write runs/{run_name}/checkpoint.pt every this many gradient steps and at the end (0: only when stopped
    by SIGTERM or SIGINT): networks, optimizers, the learning-rate schedule and random states; the
    dataset is read again from --dataset on resume"""
    resume: str | None = None
    """continue the run saved in this checkpoint, logging to the same TensorBoard run; its flags are
    reused, and only --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None
    """checkpoint and exit when the run reaches this step: one chunk of a longer run (a job time limit),
    continued with --resume; schedules still span --total-timesteps"""
    eval_model: str | None = None
    """evaluate this saved model or checkpoint (env and sizes come from the file) for --eval-episodes
    episodes, with --capture-video if given, and exit"""


# D4RL's reference returns (d4rl/infos.py): (random, expert) -> normalised scores 0 and 100
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
# the gymnasium env of each D4RL robot with D4RL's observation layout (ant: 111-d, with contact forces)
D4RL_ENVS = {
    "hopper": ("Hopper-v5", {}),
    "halfcheetah": ("HalfCheetah-v5", {}),
    "walker2d": ("Walker2d-v5", {}),
    "ant": ("Ant-v4", {"use_contact_forces": True}),
}
D4RL_NAME = re.compile(
    r"^(hopper|halfcheetah|walker2d|ant)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v(\d)$"
)
D4RL_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def check_args(args: Args) -> None:
    """Stop with a one-line error naming the fix, before anything is loaded."""
    if not args.beta > 0:
        raise SystemExit(f"error: --beta must be > 0 (got {args.beta}); the paper uses 2 on locomotion")
    if not 0 < args.expectile < 1:
        raise SystemExit(f"error: --expectile must be in (0, 1) (got {args.expectile}); IQL uses 0.7")
    if not args.exp_clip > 0:
        raise SystemExit(f"error: --exp-clip must be > 0 (got {args.exp_clip}); the paper uses 7")
    if not args.eta >= 0:
        raise SystemExit(f"error: --eta must be >= 0 (got {args.eta}); 3 on locomotion, 0 for behaviour cloning")
    if not args.max_weight > 0:
        raise SystemExit(f"error: --max-weight must be > 0 (got {args.max_weight}); IQL uses 100")
    if args.reward_scale is not None and not args.reward_scale > 0:
        raise SystemExit(f"error: --reward-scale must be > 0 (got {args.reward_scale}); leave it out to derive it")
    if args.batch_size < 1 or args.total_timesteps < 1:
        raise SystemExit("error: --batch-size and --total-timesteps must be positive")
    if args.eval_frequency < 1:
        raise SystemExit(f"error: --eval-frequency must be >= 1 (got {args.eval_frequency}); it is in gradient steps")
    if args.checkpoint_frequency < 0:
        raise SystemExit(
            f"error: --checkpoint-frequency must be >= 0 (got {args.checkpoint_frequency}); 0 turns it off"
        )


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def read_d4rl_hdf5(path: str) -> tuple[dict, dict]:
    """The arrays and attributes of a D4RL-format HDF5 file, after checking its keys."""
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: dataset file {path} does not exist; check the path (or make one with "
            "tools/make_offline_dataset.py)"
        )
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in D4RL_REQUIRED_KEYS if k not in f]
        if missing:
            raise SystemExit(
                f"error: {path} lacks the D4RL keys {missing} (has {sorted(f.keys())}); a D4RL file "
                f"needs {list(D4RL_REQUIRED_KEYS)} and optionally next_observations"
            )
        raw = {k: f[k][()] for k in (*D4RL_REQUIRED_KEYS, "next_observations") if k in f}
        attrs = dict(f.attrs)
    n = len(raw["rewards"])
    if any(len(v) != n for v in raw.values()):
        raise SystemExit(f"error: {path}: its arrays have different lengths {[(k, len(v)) for k, v in raw.items()]}")
    return raw, attrs


def returns_to_go(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1} within each trajectory (ends[t] marks its last row): the discounted
    return the data's own actions obtained from each state. Cut short at time-outs, so there it
    underestimates the value; a diagnostic for V, never a training target."""
    out = np.zeros(len(rewards), dtype=np.float64)
    g = 0.0
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
        last = np.zeros(len(obs), dtype=bool)
        last[-1] = True
        keep = ~((timeouts | last) & ~terminals)  # no true next observation: drop (as d4rl does)
        next_obs = np.where(terminals[:, None], obs, next_obs)  # unused (done = 1); not the next start
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
    """Returns of the trajectories in D4RL flat arrays (ending at terminals, time-outs, or the end)."""
    ends = np.asarray(raw["terminals"], dtype=bool).reshape(-1) | np.asarray(raw["timeouts"], dtype=bool).reshape(-1)
    ends[-1] = True
    episode_id = np.concatenate([[0], np.cumsum(ends)[:-1]])
    return np.bincount(episode_id, weights=np.asarray(raw["rewards"], dtype=np.float64).reshape(-1))


def minari_to_d4rl(dataset) -> dict:
    """A Minari dataset's episodes as D4RL flat arrays (with next_observations)."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for ep in dataset.iterate_episodes():
        if isinstance(ep.observations, dict):
            raise SystemExit(
                "error: this Minari dataset has dict observations; xql_offline.py needs flat (Box) observations"
            )
        parts["observations"].append(ep.observations[:-1])
        parts["next_observations"].append(ep.observations[1:])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminals"].append(ep.terminations)
        parts["timeouts"].append(ep.truncations)
    return {k: np.concatenate(v) for k, v in parts.items()}


def d4rl_file(name: str) -> tuple[str, str]:
    """D4RL's server folder and file name of a locomotion dataset. -v0 files carry no version and
    medium-replay-v0 is "mixed" (walker2d's is walker_mixed.hdf5); -v1 and -v2 are named
    robot_kind-vN.hdf5 under gym_mujoco_v1/ and gym_mujoco_v2/."""
    robot, kind, version = D4RL_NAME.match(name).groups()
    if version == "0":
        if kind == "full-replay":
            raise SystemExit(f"error: {name}: D4RL has no full-replay-v0; use {robot}-full-replay-v2")
        if kind == "medium-replay":
            return "gym_mujoco", f"{'walker' if robot == 'walker2d' else robot}_mixed.hdf5"
        return "gym_mujoco", f"{robot}_{kind.replace('-', '_')}.hdf5"
    if version not in ("1", "2"):
        raise SystemExit(f"error: {name}: D4RL's locomotion datasets are -v0, -v1 and -v2")
    return f"gym_mujoco_v{version}", f"{robot}_{kind.replace('-', '_')}-v{version}.hdf5"


def d4rl_cache_path(name: str) -> str:
    """Where D4RL keeps `name`'s file: $D4RL_DATASET_DIR or ~/.d4rl/datasets, under D4RL's file name."""
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    return os.path.join(folder, d4rl_file(name)[1])


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
        meta = {
            "env_id": D4RL_ENVS[robot][0],
            "env_kwargs": D4RL_ENVS[robot][1],
            "ref_scores": D4RL_REF_SCORES[robot],
        }
        try:
            import d4rl  # noqa: F401  (optional: needs gym < 0.25 and mujoco-py)
            import gym as old_gym

            return {"raw": old_gym.make(spec).get_dataset(), **meta}
        except ImportError:
            pass
        path = d4rl_cache_path(spec)
        if not os.path.isfile(path):
            folder, file = d4rl_file(spec)
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
                f'error: {spec} looks like a Minari id, and minari is not installed: pip install "minari[hdf5]"'
            ) from None
        try:
            dataset = minari.load_dataset(spec)
        except FileNotFoundError:
            raise SystemExit(
                f"error: the Minari dataset {spec} is not in the local Minari folder and cannot be "
                f"downloaded here; on a machine with internet run `minari download {spec}` and copy "
                "~/.minari/datasets (or set MINARI_DATASETS_PATH)"
            ) from None
        ref = None
        meta = dataset.storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
        return {
            "raw": minari_to_d4rl(dataset),
            "env_id": None,
            "env_kwargs": {},
            "ref_scores": ref,
            "eval_env": dataset,
        }
    raise SystemExit(
        f"error: --dataset {spec!r} is neither an .hdf5 file, a D4RL locomotion name like "
        "hopper-medium-v2, nor a Minari id like mujoco/hopper/medium-v0"
    )


def dataset_name(spec: str) -> str:
    """The dataset's name in run names: a file's name without folder or extension, a Minari id with '-'."""
    if spec.endswith((".hdf5", ".h5")) or os.path.isfile(spec):
        return os.path.splitext(os.path.basename(spec))[0]
    return spec.replace("/", "-")


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


def make_env(
    env_id: str,
    seed: int,
    env_kwargs: dict | None = None,
    capture_video: bool = False,
    video_folder: str | None = None,
    minari_dataset=None,
    every: int = 1,
):
    if minari_dataset is not None and env_id is None:
        env = minari_dataset.recover_environment(eval_env=True, render_mode="rgb_array" if capture_video else None)
    else:
        env = gym.make(env_id, render_mode="rgb_array" if capture_video else None, **(env_kwargs or {}))
    if capture_video:  # the first episode of every evaluation (of `every` episodes), one file each
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep % every == 0)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def check_env_matches(env: gym.Env, env_name: str, data: dict) -> None:
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise SystemExit(f"error: {env_name} has action space {space}; xql_offline.py needs a 1-D continuous Box")
    obs_shape, act_shape = data["observations"].shape[1:], data["actions"].shape[1:]
    if env.observation_space.shape != obs_shape or space.shape != act_shape:
        raise SystemExit(
            f"error: the dataset has observations {obs_shape} and actions {act_shape}, but {env_name} has "
            f"{env.observation_space.shape} and {space.shape}; pass the matching --env-id"
        )


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int, layer_norm: bool = False) -> nn.Sequential:
    def norm():
        return nn.LayerNorm(hidden) if layer_norm else nn.Identity()

    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        norm(),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        norm(),
        nn.ReLU(),
        nn.Linear(hidden, out_dim),
    )


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class ValueNetwork(nn.Module):
    """V(s) with LayerNorm (the paper adds it to V for stability)."""

    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden, layer_norm=True)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class GaussianPolicy(nn.Module):
    """IQL's policy: Gaussian, mean tanh-squashed into the action bounds, state-independent log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, low, high, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, len(low), hidden)
        self.log_std = nn.Parameter(torch.zeros(len(low)))
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action, used for evaluation."""
        return torch.tanh(self.net(obs)) * self.action_scale + self.action_bias

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self(obs), std).log_prob(actions).sum(-1)


# ---------------------------------------------------------------------------------------------
# Losses (pure functions: tensors in, tensors out)
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
    an adaptive learning rate. Offline, z is clipped from above only, min(z, clip) (the authors'
    offline code); clipped samples get no gradient. clip=None skips the clip.
    """
    z = (target - pred) / beta
    if clip is not None:
        z = z.clamp(max=clip)
    m = z.max().detach().clamp(min=-1.0)
    return (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()


def expectile_loss(pred: torch.Tensor, target: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's expectile regression (Kostrikov et al. 2021, Eq. 5): mean(|e - 1(u < 0)| u^2) with u = target - pred.
    Its minimiser over a constant pred is the e-expectile of the targets: the mean at e = 0.5, towards
    the max as e -> 1. The baseline of --value-loss expectile, so X-QL and IQL compare from one file."""
    u = target - pred
    return (torch.abs(expectile - (u < 0).float()) * u.pow(2)).mean()


def value_loss_fn(v, q, args) -> torch.Tensor:
    """V's loss: X-QL's Gumbel regression (Eq. 11) or IQL's expectile regression."""
    if args.value_loss == "expectile":
        return expectile_loss(v, q, args.expectile)
    return gumbel_loss(v, q, args.beta, args.exp_clip)


def awr_weights(q: torch.Tensor, v: torch.Tensor, eta: float, max_weight: float) -> torch.Tensor:
    """Eq. (12)'s advantage weights min(exp(eta * (Q(s,a) - V(s))), max_weight), detached."""
    return torch.exp(eta * (q - v)).clamp(max=max_weight).detach()


def awr_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. (12): -E[w * ln pi(a|s)] on dataset actions."""
    return -(weights * log_prob).mean()


def critic_target(rewards, dones, v_next, gamma: float):
    """The critics' target of offline X-QL (Section 3.5, as IQL): r + gamma * (1 - done) * V(s'), with the V just
    updated (no target V); done = 1 for terminations only, time-outs bootstrap."""
    return rewards + gamma * (1.0 - dones) * v_next


def normalized_score(returns, ref_min: float, ref_max: float):
    """D4RL's normalised score 100 * (R - R_random) / (R_expert - R_random)."""
    return 100.0 * (np.asarray(returns) - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate_policy(policy: GaussianPolicy, env: gym.Env, n_episodes: int, device: torch.device, seed: int):
    """Returns of `n_episodes` episodes acting with the policy's mean action."""
    returns = []
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    while len(returns) < n_episodes:
        action = policy(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))[0].cpu().numpy()
        obs, _, terminated, truncated, info = env.step(np.clip(action, low, high))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            obs, _ = env.reset()
    return np.array(returns)


def evaluate(
    model_path: str,
    env_id: str | None = None,
    eval_episodes: int = 10,
    seed: int = 0,
    device: str = "cpu",
    capture_video: bool = False,
    video_folder: str = "videos/eval",
) -> np.ndarray:
    """Evaluation returns of a model written by --save-model or a checkpoint. The eval env (a gymnasium
    id with its kwargs, or the Minari dataset's own env) and the sizes come from the file; `env_id`
    overrides the env (same spaces only)."""
    checkpoint = torch.load(model_path, map_location=device, weights_only=False)  # our own file: trusted
    saved = checkpoint["args"]
    env_kwargs, minari_dataset = ({}, None) if env_id else (checkpoint.get("env_kwargs", {}), None)
    env_id = env_id or checkpoint.get("env_id")
    if env_id is None:  # the dataset's own eval env (Minari)
        import minari

        minari_dataset = minari.load_dataset(saved["dataset"])
    if capture_video and env_id is not None:
        check_video_prerequisites(env_id)
    env = make_env(env_id, seed, env_kwargs, capture_video, video_folder, minari_dataset, eval_episodes)
    policy = GaussianPolicy(
        env.observation_space.shape[0], env.action_space.low, env.action_space.high, saved["hidden_size"]
    ).to(device)
    try:
        policy.load_state_dict(checkpoint["policy"])
    except RuntimeError:  # size mismatch
        raise SystemExit(
            f"error: {model_path} was trained on {saved['dataset']}, whose spaces differ from {env_id}'s; "
            "leave out the env id to use the dataset's env"
        ) from None
    return evaluate_policy(policy, env, eval_episodes, torch.device(device), seed)


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
    info = load_dataset(args.dataset)
    data = qlearning_dataset(info["raw"], args.gamma)
    env_id = args.env_id or info["env_id"]
    if env_id is None and "eval_env" not in info:
        raise SystemExit(f"error: cannot infer the evaluation env of {args.dataset}; pass --env-id")
    env_kwargs = info["env_kwargs"] if args.env_id is None else {}
    if checkpoint:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{dataset_name(args.dataset)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    video_folder, minari_dataset = f"videos/{run_name}", info.get("eval_env")
    if args.capture_video and env_id is not None:
        check_video_prerequisites(env_id)
    env = make_env(env_id, args.seed, env_kwargs, args.capture_video, video_folder, minari_dataset, args.eval_episodes)
    env_name = env_id or env.spec.id
    check_env_matches(env, env_name, data)

    returns_in_data = episode_returns(info["raw"])
    reward_scale = 1.0
    if args.reward_scale is not None:
        reward_scale = args.reward_scale
    elif args.normalize_reward:  # every dataset, file or Minari: the same data gets the same scale
        reward_scale = 1000.0 / max(returns_in_data.max() - returns_in_data.min(), 1e-8)
    ref_scores = info["ref_scores"]

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

    # the whole dataset sits on the device as tensors: a batch is one index operation, no Python copy
    D = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    D["rewards"] = D["rewards"] * reward_scale
    D["returns_to_go"] = D["returns_to_go"] * reward_scale
    n_data = len(D["rewards"])
    obs_dim, act_dim = D["observations"].shape[1], D["actions"].shape[1]

    policy = GaussianPolicy(obs_dim, env.action_space.low, env.action_space.high, args.hidden_size).to(device)
    vf = ValueNetwork(obs_dim, args.hidden_size).to(device)
    critics = [QNetwork(obs_dim, act_dim, args.hidden_size).to(device) for _ in range(2)]
    critics_target = [QNetwork(obs_dim, act_dim, args.hidden_size).to(device) for _ in range(2)]
    for qf, qf_target in zip(critics, critics_target):
        qf_target.load_state_dict(qf.state_dict())
    q_params = [p for qf in critics for p in qf.parameters()]
    q_target_params = [p for qf in critics_target for p in qf.parameters()]
    # fused Adam: one kernel for all parameters (about 3x faster than the default on a CPU)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.learning_rate, fused=True)
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, fused=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    policy_lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(policy_optimizer, args.total_timesteps)
    print(
        f"{args.exp_name}: {args.dataset}: {n_data} transitions ({len(returns_in_data)} trajectories, return "
        f"{returns_in_data.mean():.1f} mean, {returns_in_data.min():.1f}..{returns_in_data.max():.1f}), reward scale "
        f"{reward_scale:.4g}; eval env {env_name}; value loss {args.value_loss} "
        f"({f'beta={args.beta}' if args.value_loss == 'gumbel' else f'expectile={args.expectile}'}), eta={args.eta}; "
        f"device={device}; "
        f"logging to runs/{run_name}"
    )
    print(
        f"the critics' Polyak rate (CleanRL's --tau) is --lam {args.lam}; --beta {args.beta} is the Gumbel temperature"
    )
    print(
        f"the data's discounted returns (scaled) are {D['returns_to_go'].mean():.1f} on average, "
        f"{D['returns_to_go'].max():.1f} at most: losses/v_values far above losses/data_discounted_return "
        "(a soft maximum over the data's actions sits somewhat above it) is over-estimation"
    )

    networks = {"policy": policy, "vf": vf}
    networks |= {f"qf{i}": qf for i, qf in enumerate(critics, start=1)}
    networks |= {f"qf{i}_target": qf for i, qf in enumerate(critics_target, start=1)}
    optimizers = {"v": v_optimizer, "q": q_optimizer, "policy": policy_optimizer, "policy_lr": policy_lr_schedule}
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
                "rng": rng_state(),
                "policy": policy.state_dict(),  # --eval-model reads these, as in a saved model
                "env_id": env_id,
                "env_kwargs": env_kwargs,
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

    start_step = 0
    if checkpoint:
        for name, net in networks.items():
            net.load_state_dict(checkpoint["networks"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        # a longer --total-timesteps stretches the rest of the cosine schedule to the new end (a kink, no restart)
        policy_lr_schedule.T_max = args.total_timesteps
        start_step = checkpoint["global_step"]
        set_rng_state(checkpoint["rng"])
        print(f"resumed {args.resume} at step {start_step} of {args.total_timesteps}")

    start_time = time.time()
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or (global_step == args.stop_at and global_step > start_step):
            write_checkpoint(global_step)
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            print(f"stopped by {why} at step {global_step}; continue with --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if args.checkpoint_frequency and global_step > start_step and global_step % args.checkpoint_frequency == 0:
            write_checkpoint(global_step)
        idx = torch.randint(0, n_data, (args.batch_size,), device=device)
        b_obs, b_actions, b_rewards = D["observations"][idx], D["actions"][idx], D["rewards"][idx]
        b_next_obs, b_dones = D["next_observations"][idx], D["dones"][idx]

        # ---- V: Gumbel regression on min_i Q_bar_i(s, a) at dataset actions ----
        with torch.no_grad():
            q_bar = torch.min(critics_target[0](b_obs, b_actions), critics_target[1](b_obs, b_actions))
        v = vf(b_obs)
        v_loss = value_loss_fn(v, q_bar, args)
        v_optimizer.zero_grad(set_to_none=True)
        v_loss.backward()
        v_optimizer.step()

        # ---- policy: advantage-weighted regression (Eq. 12) with the V just updated ----
        with torch.no_grad():
            weights = awr_weights(q_bar, vf(b_obs), args.eta, args.max_weight)
        policy_loss = awr_loss(policy.log_prob(b_obs, b_actions), weights)
        policy_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        policy_optimizer.step()
        policy_lr_schedule.step()

        # ---- Q: regression on r + gamma (1 - done) V(s') ----
        with torch.no_grad():
            y = critic_target(b_rewards, b_dones, vf(b_next_obs), args.gamma)
        q_values = [qf(b_obs, b_actions) for qf in critics]
        q_loss = sum((q - y).pow(2).mean() for q in q_values)
        q_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        q_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(q_target_params, q_params, args.lam)

        if global_step % args.log_frequency == 0:
            if not (torch.isfinite(v_loss) and torch.isfinite(q_loss) and torch.isfinite(policy_loss)):
                raise SystemExit(
                    f"error: a loss is not finite at step {global_step} (value {v_loss.item()}, critics "
                    f"{q_loss.item()}, policy {policy_loss.item()}): training diverged; try a larger --beta or a "
                    "smaller --exp-clip"
                )
            writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
            writer.add_scalar("losses/qf_loss", q_loss.item() / 2, global_step)
            writer.add_scalar("losses/policy_loss", policy_loss.item(), global_step)
            writer.add_scalar("losses/v_values", v.mean().item(), global_step)
            # the same states' discounted return in the data: what V is to be read against
            writer.add_scalar("losses/data_discounted_return", D["returns_to_go"][idx].mean().item(), global_step)
            writer.add_scalar("losses/qf1_values", q_values[0].mean().item(), global_step)
            if args.value_loss == "gumbel":
                writer.add_scalar("losses/max_z", ((q_bar - v) / args.beta).max().item(), global_step)
            writer.add_scalar("losses/awr_weights_mean", weights.mean().item(), global_step)
            writer.add_scalar(
                "losses/awr_weights_capped_frac", (weights >= args.max_weight).float().mean().item(), global_step
            )
            writer.add_scalar("charts/policy_learning_rate", policy_optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)

        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            returns = evaluate_policy(policy, env, args.eval_episodes, device, args.seed + 10_000)
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            line = f"step {global_step + 1}/{args.total_timesteps}: eval return {returns.mean():.1f} +- {returns.std():.1f}"
            if ref_scores is not None:
                score = normalized_score(returns, *ref_scores)
                writer.add_scalar("eval/normalized_score", score.mean(), global_step)
                line += f", normalized score {score.mean():.1f} +- {score.std():.1f}"
            print(f"{line}, SPS {int((global_step + 1 - start_step) / (time.time() - start_time))}", flush=True)

    if args.checkpoint_frequency:  # the end too, so that a finished run can be extended with --resume
        write_checkpoint(args.total_timesteps)
        print(f"checkpoint written to {checkpoint_path}")
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save(
            {
                "args": vars(args),
                "policy": policy.state_dict(),
                "vf": vf.state_dict(),
                "critics": [qf.state_dict() for qf in critics],
                "env_id": env_id,  # None: the Minari dataset's own eval env
                "env_kwargs": env_kwargs,
            },
            model_path,
        )
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, None, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"reloaded model: eval return {returns.mean():.1f} +- {returns.std():.1f}")

    env.close()
    writer.close()
