"""Soft Q-learning DQN on Atari: DQN with entropy- or KL-regularised ("soft") backups, single file.

Paper: Schulman, Chen, Abbeel, "Equivalence Between Policy Gradients and Soft Q-Learning", 2017,
Section 6.2 ("a one-line change to a DQN implementation"). Docs: docs/soft_dqn.md.

For a Q-function and a temperature tau, with LSE(s) = tau * ln sum_a exp(Q(s,a)/tau), the
Boltzmann policy pi_Q = exp((Q - LSE)/tau), its entropy H(s) and KL(s) = KL(pi_Q || uniform)
= ln|A| - H(s), the three targets (Eqs. 81-83, in the corrected form of Eqs. 39/45) are

  hard     y = r + gamma * (1 - done) * max_a' Q_bar(s', a')
  entropy  y = r + gamma * (1 - done) * LSE_Q_bar(s')
  kl       y = r + gamma * (1 - done) * (LSE_Q_bar(s') - tau * ln|A|)       (V = tau ln mean exp(Q/tau))

and with n-step returns (Eq. 46; the tau*KL at s_t cancels), j = steps to the end of the window
or of the episode, whichever comes first:

  y_t = r_t + sum_{k=1}^{j-1} gamma^k (r_{t+k} + e(s_{t+k})) + gamma^j (1 - done) V_Q_bar(s_{t+j}),
  e = +tau * H (entropy), -tau * KL (kl), 0 (hard), computed from Q_bar at the stored states.

Terminations stop bootstrapping; truncations (the 108 000-frame limit) bootstrap from the true
last observation. The loss is the squared error to y (CleanRL's dqn_atari.py; Nature DQN uses a
Huber loss and RMSprop). Exploration is epsilon-greedy as in the paper (all conditions);
`--boltzmann` samples from pi_Q instead.

Settings follow CleanRL's dqn_atari.py (from OpenAI baselines): Adam 1e-4, replay 1M, batch 32,
a gradient step every 4 env steps, target copy every 1000 steps, 80k warm-up, epsilon 1 -> 0.01
over the first 10% of 10M steps, rewards clipped to their sign for training (so tau acts on that
scale; logged returns are the game's own), tau = 0.1 for the soft targets (the paper: entropy with
tau = 0.1 did a bit better than DQN, KL worse).

Atari: ale-py's C++ vector env (`AtariVectorEnv`), which does DeepMind's preprocessing itself
(no-op starts, frame skip 4 with max-pooling, 84x84 grayscale, 4-frame stack, fire on reset) and
needs no OpenCV, unlike gymnasium's AtariPreprocessing; it is also faster, since frames never
cross into Python before they are 84x84. Sticky actions are off by default (the paper's setting;
`--sticky-actions` uses ALE v5's 0.25); a life lost ends a training episode (`--no-episodic-life`
for whole games).

Replay stores each frame once, not 4-frame stacks: an episode writes its reset stack, then one
frame per step, and a transition keeps the index of its newest frame, so a stack is 4
consecutive frames and never mixes two episodes. 1M transitions take about 7.1 GB (CleanRL's
buffer of stacks and next-stacks: about 56 GB, or 28 GB with its memory optimisation).

Usage:
    python soft_dqn_atari.py --env-id BreakoutNoFrameskip-v4 --target entropy
    python soft_dqn_atari.py --env-id ALE/Pong-v5 --target kl --tau 0.1 --n-step 3
"""

import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

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
    env_id: str = "BreakoutNoFrameskip-v4"
    """the Atari game: BreakoutNoFrameskip-v4, ALE/Breakout-v5 or breakout all mean Breakout"""
    total_timesteps: int = 10000000
    """total timesteps of the experiments (agent steps; 4 frames each)"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimizer"""
    buffer_size: int = 1000000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    target: Literal["hard", "entropy", "kl"] = "entropy"
    """the backup: `hard` (DQN), `entropy` (soft Q, entropy bonus) or `kl` (soft Q, KL to uniform)"""
    tau: float = 0.1
    """the temperature tau of the soft targets (on the clipped-reward scale)"""
    n_step: int = 1
    """n of the n-step return (Eq. 46)"""
    target_network_frequency: int = 1000
    """the timesteps it takes to copy the Q-network into the target network"""
    batch_size: int = 32
    """the batch size of sample from the reply memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.10
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    boltzmann: bool = False
    """act by sampling the Boltzmann policy pi_Q (temperature tau) instead of epsilon-greedy"""
    learning_starts: int = 80000
    """timestep to start learning"""
    train_frequency: int = 4
    """the frequency of training (env steps per gradient step)"""
    sticky_actions: bool = False
    """repeat the previous action with probability 0.25 (ALE v5); off in the paper's setting"""
    episodic_life: bool = True
    """end training episodes (not the logged game episodes) at a life loss, as DeepMind and CleanRL do;
    `--no-episodic-life` trains on whole games"""
    max_episode_frames: int = 108000
    """truncate episodes after this many frames (ALE's 30 minutes; truncations still bootstrap)"""
    eval_frequency: int = 250000
    """run evaluation episodes every this many steps"""
    eval_episodes: int = 10
    """the number of evaluation episodes (epsilon = eval-epsilon)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation episodes"""
    log_frequency: int = 100
    """log losses every this many gradient steps"""
    checkpoint_frequency: int = 0
    """write runs/{run_name}/checkpoint.pt every this many env steps and at the end (0: only when stopped
    by SIGTERM or SIGINT): networks, optimizer, random states and counters; the replay buffer only
    with --checkpoint-buffer. A resumed run starts new games (ale-py's vector env cannot save its emulator)"""
    checkpoint_buffer: bool = False
    """also put the replay buffer in checkpoints (its size is printed at start: 7 GB at the default 1M
    frames); without it a resumed run refills the buffer for --learning-starts steps before training"""
    resume: str | None = None
    """continue the run saved in this checkpoint, logging to the same TensorBoard run; its flags are
    reused, and only --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None
    """checkpoint and exit when the run reaches this step: one chunk of a longer run (a job time limit),
    continued with --resume; schedules still span --total-timesteps"""
    eval_model: str | None = None
    """evaluate this saved model or checkpoint (the game comes from the file) for --eval-episodes
    episodes, with --capture-video if given, and exit"""


def check_args(args: Args) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    if args.target != "hard" and not args.tau > 0:
        raise SystemExit(f"error: --tau must be > 0 with --target {args.target} (got {args.tau}); the paper uses 0.1")
    if args.boltzmann and not args.tau > 0:
        raise SystemExit(f"error: --boltzmann needs --tau > 0 (got {args.tau})")
    if args.n_step < 1:
        raise SystemExit(f"error: --n-step must be at least 1 (got {args.n_step})")
    if args.batch_size < 1 or args.buffer_size < 4 * args.batch_size or args.train_frequency < 1:
        raise SystemExit("error: --batch-size and --train-frequency must be positive and --buffer-size >= 4 x batch")
    if args.eval_frequency < 1:
        raise SystemExit(f"error: --eval-frequency must be >= 1 (got {args.eval_frequency}); it is in env steps")
    if args.learning_starts >= args.total_timesteps:
        raise SystemExit(
            f"error: --learning-starts {args.learning_starts} >= --total-timesteps {args.total_timesteps}: no "
            "gradient step would run; lower --learning-starts"
        )
    if args.checkpoint_frequency < 0:
        raise SystemExit(
            f"error: --checkpoint-frequency must be >= 0 (got {args.checkpoint_frequency}); 0 turns it off"
        )
    if args.capture_video:
        check_video_prerequisites()


def check_video_prerequisites() -> None:
    """Videos are written with moviepy: say so at start, not at the first evaluation."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise SystemExit("error: --capture-video needs moviepy: pip install moviepy") from None


def atari_game(env_id: str) -> str:
    """The ALE game name of an Atari env id, or a one-line error for anything else."""
    import ale_py

    m = re.fullmatch(r"(?:ALE/)?([A-Za-z]+?)(?:NoFrameskip)?(?:-ram)?(?:-v\d+)?", env_id)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower() if m else ""
    roms = set(ale_py.roms.get_all_rom_ids())
    if "-ram" in env_id or snake not in roms:
        raise SystemExit(
            f"error: {env_id} is not an Atari game with image observations and discrete actions; "
            "use an id like BreakoutNoFrameskip-v4 or ALE/Pong-v5 (continuous control: xql_sac.py, iq_continuous.py)"
        )
    return snake


def make_env(
    game: str, num_envs: int, seed: int, sticky: bool, episodic_life: bool, max_frames: int = 108000, rgb: bool = False
):
    """ale-py's C++ vector env with DeepMind's preprocessing; rewards unclipped (we clip for training).
    rgb=True: the same env showing the game's 210x160 colour screen (for videos; fed the same actions
    with the same seed it plays the same game)."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(
        game,
        num_envs=num_envs,
        num_threads=1,
        repeat_action_probability=0.25 if sticky else 0.0,
        # DeepMind's episodic life: a life loss is a termination but the game goes on. ale-py's own
        # `episodic_life` resets the whole game at every life loss instead, so it is not used
        episodic_life=False,
        life_loss_info=episodic_life,
        reward_clipping=False,
        max_num_frames_per_episode=max_frames,
        noop_max=30,
        frameskip=4,
        stack_num=1 if rgb else 4,
        img_height=210 if rgb else 84,
        img_width=160 if rgb else 84,
        grayscale=not rgb,
        maxpool=True,
        use_fire_reset=True,
    )
    env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# Replay: each frame stored once
# ---------------------------------------------------------------------------------------------
class FrameReplayBuffer:
    """Frames in one circular array; transitions keep the absolute index of their newest frame.

    An episode writes its reset stack (4 frames), then one frame per step (the true last frame too),
    so the stack of any stored state is 4 consecutive frames of one episode. A transition whose
    oldest frame has been overwritten is never sampled."""

    def __init__(self, capacity: int, stack: int = 4, frame_shape=(84, 84)):
        self.capacity, self.stack = capacity, stack
        self.frames = np.zeros((capacity, *frame_shape), dtype=np.uint8)
        self.frame_count = 0  # frames written so far (absolute)
        self.newest = np.zeros(capacity, dtype=np.int64)  # absolute frame index of s_t's newest frame
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=bool)  # s_{t+1} is terminal: no bootstrap
        self.ends = np.zeros(capacity, dtype=bool)  # s_{t+1} ends the episode (termination or truncation)
        self.count = 0  # transitions written so far (absolute)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.frames, self.newest, self.actions, self.rewards, self.dones, self.ends))

    ARRAYS = ("frames", "newest", "actions", "rewards", "dones", "ends")

    def state_dict(self) -> dict:
        """Torch tensors sharing the arrays' memory: torch.save writes them apart, with no 4 GB pickle limit."""
        return {"frame_count": self.frame_count, "count": self.count} | {
            k: torch.from_numpy(getattr(self, k)) for k in self.ARRAYS
        }

    def load_state_dict(self, state: dict) -> None:
        self.frame_count, self.count = state["frame_count"], state["count"]
        for k in self.ARRAYS:
            getattr(self, k)[:] = state[k].numpy()

    def cut_episode(self) -> None:
        """End the stored episode here as a truncation (its last next-frame is stored): a resumed run
        starts a new game, and no n-step window may run across into it."""
        if self.count:
            self.ends[(self.count - 1) % self.capacity] = True

    def _write_frame(self, frame) -> None:
        self.frames[self.frame_count % self.capacity] = frame
        self.frame_count += 1

    def start_episode(self, stack) -> None:
        for frame in stack:
            self._write_frame(frame)

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_frame) -> None:
        i = self.count % self.capacity
        self.newest[i] = self.frame_count - 1
        self.actions[i], self.rewards[i] = action, reward
        self.dones[i], self.ends[i] = terminated, terminated or truncated
        self._write_frame(next_frame)
        self.count += 1

    def stacks(self, newest: np.ndarray) -> np.ndarray:
        """(..., stack, 84, 84) uint8 stacks whose newest frames have these absolute indices."""
        idx = newest[..., None] + np.arange(1 - self.stack, 1)
        return self.frames[idx % self.capacity]

    def sample_ids(self, batch_size: int, n_step: int, rng: np.random.Generator) -> np.ndarray:
        """Absolute ids t of transitions whose n-step window is stored and whose frames are intact."""
        lo, hi = max(0, self.count - self.capacity), self.count - n_step  # t + n - 1 < count
        ids = np.empty(0, dtype=np.int64)
        while len(ids) < batch_size:
            cand = rng.integers(lo, hi + 1, size=2 * batch_size)
            oldest = self.newest[cand % self.capacity] - (self.stack - 1)
            ids = np.concatenate([ids, cand[oldest >= self.frame_count - self.capacity]])
        return ids[:batch_size]

    def sample(self, batch_size: int, n_step: int, rng: np.random.Generator) -> dict:
        """obs (B,4,84,84); actions (B,); for k < n: rewards, dones, ends (B,n) of step t+k and
        next_obs (B,n,4,84,84) = s_{t+k+1}. Steps past an episode's end are masked by `ends`."""
        t = self.sample_ids(batch_size, n_step, rng)
        window = (t[:, None] + np.arange(n_step)) % self.capacity
        p = self.newest[t % self.capacity]
        return {
            "obs": self.stacks(p),
            "actions": self.actions[t % self.capacity],
            "rewards": self.rewards[window],
            "dones": self.dones[window],
            "ends": self.ends[window],
            # within an episode frames are consecutive, so s_{t+k+1}'s newest frame is p + k + 1
            "next_obs": self.stacks(p[:, None] + np.arange(1, n_step + 1)),
        }


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------
class QNetwork(nn.Module):
    """The Nature DQN CNN: 4x84x84 uint8 frames -> |A| Q-values."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.float() / 255.0)


# ---------------------------------------------------------------------------------------------
# Targets (pure functions: tensors in, tensors out)
# ---------------------------------------------------------------------------------------------
def soft_value(q: torch.Tensor, tau: float, target: str) -> torch.Tensor:
    """V(s) of each backup, computed with a stable log-sum-exp: max Q (hard), LSE (entropy),
    LSE - tau ln|A| = tau ln mean exp(Q/tau) (kl, Eq. 29)."""
    if target == "hard":
        return q.max(-1).values
    lse = tau * torch.logsumexp(q / tau, dim=-1)
    return lse if target == "entropy" else lse - tau * np.log(q.shape[-1])


def regularizer(q: torch.Tensor, tau: float, target: str) -> torch.Tensor:
    """e(s) of Eq. 46: +tau * H(pi_Q) (entropy), -tau * KL(pi_Q || uniform) = -tau (ln|A| - H) (kl), 0 (hard)."""
    if target == "hard":
        return torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    log_pi = torch.log_softmax(q / tau, dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return tau * entropy if target == "entropy" else -tau * (np.log(q.shape[-1]) - entropy)


def nstep_target(rewards, dones, ends, q_next, gamma: float, tau: float, target: str):
    """Eq. 46's target. rewards, dones, ends: (B, n), step t+k's reward and whether s_{t+k+1} is
    terminal / ends the episode; q_next: (B, n, |A|) = Q_bar(s_{t+k+1}). The window stops at the
    first end: a termination adds no bootstrap, a truncation bootstraps from its final state."""
    n = rewards.shape[1]
    discounts = gamma ** torch.arange(n + 1, dtype=rewards.dtype, device=rewards.device)
    ended_before = torch.cumsum(ends.to(rewards.dtype), dim=1) - ends.to(rewards.dtype)  # ends among k' < k
    alive = (ended_before == 0).to(rewards.dtype)  # step t+k is inside the episode
    y = (discounts[:n] * alive * rewards).sum(1)
    if n > 1:  # regulariser of the intermediate states s_{t+1} .. s_{t+n-1}
        e = regularizer(q_next[:, :-1], tau, target)
        y = y + (discounts[1:n] * alive[:, 1:] * e).sum(1)
    # bootstrap from s_{t+j}: the first state that ends the episode, or the window's last
    is_last = ends.clone()
    is_last[:, -1] = True
    boot = alive * is_last.to(rewards.dtype) * (1.0 - dones.to(rewards.dtype))
    return y + (discounts[1:] * boot * soft_value(q_next, tau, target)).sum(1)


@torch.no_grad()
def target_q_next(target_network: QNetwork, next_obs: torch.Tensor, ends: torch.Tensor, target: str) -> torch.Tensor:
    """Q_bar(s_{t+k+1}) for k < n, (B, n, |A|), as nstep_target takes it (Eq. 46). The hard target has
    no regulariser (e = 0), so only its bootstrap state s_{t+j} is evaluated and the other rows, which
    nstep_target masks, are left 0: n times fewer forward passes."""
    B, n = ends.shape
    if target != "hard" or n == 1:
        return target_network(next_obs.flatten(0, 1)).view(B, n, -1)
    j = torch.where(ends.any(1), ends.int().argmax(1), n - 1)  # the first end in the window, else its last step
    rows = torch.arange(B, device=ends.device)
    q_boot = target_network(next_obs[rows, j])
    q_next = q_boot.new_zeros(B, n, q_boot.shape[-1])
    q_next[rows, j] = q_boot
    return q_next


def train_step(
    q_network: QNetwork, target_network: QNetwork, optimizer, batch: dict, gamma: float, tau: float, target: str
) -> dict:
    """One gradient step on the squared error between Q(s_t, a_t) and the n-step target. Batch: tensors as
    FrameReplayBuffer.sample returns them (obs uint8, next_obs (B,n,4,84,84))."""
    with torch.no_grad():
        q_next = target_q_next(target_network, batch["next_obs"], batch["ends"], target)
        y = nstep_target(batch["rewards"], batch["dones"], batch["ends"], q_next, gamma, tau, target)
    q = q_network(batch["obs"]).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
    loss = F.mse_loss(q, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "q_values": q.detach().mean(), "target_values": y.mean()}


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


@torch.no_grad()
def act(
    q_network: QNetwork,
    obs: np.ndarray,
    epsilon: float,
    boltzmann: bool,
    tau: float,
    n_actions: int,
    device: torch.device,
    rng: np.random.Generator,
) -> np.ndarray:
    """Actions for a (N,4,84,84) batch: epsilon-greedy, or sampled from pi_Q = softmax(Q/tau)."""
    q = q_network(torch.as_tensor(obs, device=device))
    if boltzmann:
        return torch.distributions.Categorical(logits=q / tau).sample().cpu().numpy()
    greedy = q.argmax(1).cpu().numpy()
    explore = rng.random(len(greedy)) < epsilon
    return np.where(explore, rng.integers(0, n_actions, len(greedy)), greedy)


def evaluate_policy(
    q_network: QNetwork,
    game: str,
    n_episodes: int,
    epsilon: float,
    seed: int,
    device: torch.device,
    sticky: bool = False,
    video_folder: str | None = None,
    max_frames: int = 108000,
    video_name: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """Game returns (unclipped, whole games) of epsilon-greedy episodes, and their lengths in agent
    steps. A greedy policy that never presses FIRE after a life lost waits, in Breakout, until an
    epsilon action or the frame cap launches the ball: long games of low return. With a video folder, the first
    game is saved as `video_name`-episode-0.mp4 in colour: a twin env with the same seed, fed the
    same actions, shows the screen the network sees in 84x84 grey."""
    env = make_env(game, 1, seed, sticky, episodic_life=False, max_frames=max_frames)
    twin = make_env(game, 1, seed, sticky, False, max_frames, rgb=True) if video_folder else None
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = [twin.reset(seed=seed)[0][0, -1]] if twin else []
    returns, lengths, ret, length = [], [], 0.0, 0
    while len(returns) < n_episodes:
        action = act(q_network, obs, epsilon, False, 1.0, env.single_action_space.n, device, rng)
        obs, reward, terminated, truncated, _ = env.step(action)
        ret += float(reward[0])
        length += 1
        if twin and not returns:
            frames.append(twin.step(action)[0][0, -1])
        if terminated[0] or truncated[0]:
            returns.append(ret)
            lengths.append(length)
            ret, length = 0.0, 0
            obs, *_ = env.step(np.zeros(1, dtype=np.int64))  # NEXT_STEP autoreset: this call resets
    env.close()
    if twin:
        twin.close()
        from gymnasium.utils.save_video import save_video

        save_video(frames, video_folder, fps=15, name_prefix=video_name)
    return np.array(returns), np.array(lengths)


def evaluate(
    model_path: str,
    env_id: str | None = None,
    eval_episodes: int = 10,
    seed: int = 0,
    device: str = "cpu",
    epsilon: float | None = None,
    max_frames: int | None = None,
    video_folder: str | None = None,
) -> np.ndarray:
    """Evaluation game returns of a model written by --save-model or a checkpoint. The game, the
    evaluation epsilon and the episode cap come from the file unless given."""
    checkpoint = torch.load(model_path, map_location=device, weights_only=False)  # our own file: trusted
    saved = checkpoint["args"]
    game = atari_game(env_id or saved["env_id"])
    epsilon = saved["eval_epsilon"] if epsilon is None else epsilon
    max_frames = saved["max_episode_frames"] if max_frames is None else max_frames
    n_actions = make_env(game, 1, seed, False, False).single_action_space.n
    q_network = QNetwork(n_actions).to(device)
    try:
        q_network.load_state_dict(checkpoint["q_network"])
    except RuntimeError:  # another action set
        raise SystemExit(
            f"error: {model_path} was trained on {saved['env_id']}, whose action set differs from {env_id}'s; "
            f"leave out the env id to use {saved['env_id']}"
        ) from None
    returns, _ = evaluate_policy(
        q_network,
        game,
        eval_episodes,
        epsilon,
        seed,
        torch.device(device),
        saved["sticky_actions"],
        video_folder,
        max_frames,
    )
    return returns


# ---------------------------------------------------------------------------------------------
# Checkpoints: what a run needs to continue where it stopped (the games in progress start anew)
# ---------------------------------------------------------------------------------------------
RESUME_OVERRIDES = ("total_timesteps", "checkpoint_frequency", "checkpoint_buffer", "stop_at", "cuda", "track")


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
        if args.capture_video:
            check_video_prerequisites()
        video = "videos/eval" if args.capture_video else None
        returns = evaluate(args.eval_model, None, args.eval_episodes, args.seed, "cpu", video_folder=video)
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
    game = atari_game(args.env_id)
    start_step = checkpoint["global_step"] if checkpoint else 0
    # a resumed run starts new games, seeded by the step it resumes at
    env = make_env(game, 1, args.seed + start_step, args.sticky_actions, args.episodic_life, args.max_episode_frames)
    n_actions = env.single_action_space.n
    if checkpoint:
        run_name = checkpoint["run_name"]
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"

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
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step if checkpoint else None)
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
    rng = np.random.default_rng(args.seed)

    q_network = QNetwork(n_actions).to(device)
    target_network = QNetwork(n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    # fused Adam: one kernel for all parameters (about 3x faster than the default on a CPU)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    saved_rb = checkpoint["rb"] if checkpoint else None  # a resumed buffer keeps its size
    rb = FrameReplayBuffer(len(saved_rb["actions"]) if saved_rb else min(args.buffer_size, args.total_timesteps + 4))
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    print(
        f"{args.exp_name}: {game}, {n_actions} actions, target {args.target}"
        f"{f' (tau={args.tau})' if args.target != 'hard' else ''}, {args.n_step}-step; replay buffer "
        f"{rb.capacity} frames = {rb.nbytes / 2**30:.2f} GiB; device={device}; logging to runs/{run_name}"
    )
    print(
        f"--tau {args.tau} is the soft-Q temperature; the target network is copied every "
        f"--target-network-frequency {args.target_network_frequency} steps (CleanRL's --tau 1.0 hard copy)"
    )
    print(
        f"checkpoints go to {checkpoint_path} ({f'every {args.checkpoint_frequency} steps' if args.checkpoint_frequency else 'on SIGTERM/SIGINT only'}), "
        + (
            f"with the replay buffer: {rb.nbytes / 2**30:.2f} GiB each"
            if args.checkpoint_buffer
            else "without the replay buffer (--checkpoint-buffer adds it)"
        )
    )

    def write_checkpoint(step: int) -> None:
        """What the loop's step number `step` depends on, but the games in progress."""
        save_checkpoint(
            checkpoint_path,
            {
                "args": vars(args),
                "run_name": run_name,
                "global_step": step,
                "q_network": q_network.state_dict(),  # --eval-model reads this, as in a saved model
                "target_network": target_network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rb": rb.state_dict() if args.checkpoint_buffer else None,
                "rng": rng_state() | {"act": rng.bit_generator.state},
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

    learning_starts = args.learning_starts
    if checkpoint:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        rng.bit_generator.state = checkpoint["rng"]["act"]
        if checkpoint["rb"] is not None:
            rb.load_state_dict(checkpoint["rb"])
            rb.cut_episode()
        else:  # refill before training again; the agent acts with its Q meanwhile
            learning_starts = start_step + args.learning_starts
        print(
            f"resumed {args.resume} at step {start_step} of {args.total_timesteps}, new games; "
            + (
                "replay buffer restored"
                if checkpoint["rb"] is not None
                else f"refilling the buffer until step {learning_starts}"
            )
        )
        del checkpoint  # its copy of the buffer can be large

    start_time = time.time()
    obs, _ = env.reset(seed=args.seed + start_step)
    rb.start_episode(obs[0])
    game_return, game_length = 0.0, 0
    for global_step in range(start_step, args.total_timesteps):
        if stop_signals or (global_step == args.stop_at and global_step > start_step):
            write_checkpoint(global_step)
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            print(f"stopped by {why} at step {global_step}; continue with --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if args.checkpoint_frequency and global_step > start_step and global_step % args.checkpoint_frequency == 0:
            write_checkpoint(global_step)
        epsilon = linear_schedule(
            args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps), global_step
        )
        if global_step < args.learning_starts and not args.boltzmann:
            action = rng.integers(0, n_actions, 1)
        else:
            action = act(q_network, obs, epsilon, args.boltzmann, args.tau, n_actions, device, rng)
        next_obs, reward, terminated, truncated, info = env.step(action)
        # train on the clipped reward; log the game's own
        rb.add(int(action[0]), float(np.sign(reward[0])), bool(terminated[0]), bool(truncated[0]), next_obs[0, -1])
        game_return += float(reward[0])
        game_length += 1
        obs = next_obs
        if truncated[0] or (terminated[0] and (not args.episodic_life or info["lives"][0] == 0)):  # game over
            writer.add_scalar("charts/episodic_return", game_return, global_step)
            writer.add_scalar("charts/episodic_length", game_length, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            game_return, game_length = 0.0, 0
            obs, *_ = env.step(np.zeros(1, dtype=np.int64))  # NEXT_STEP autoreset: this call resets
            rb.start_episode(obs[0])
        elif terminated[0]:  # episodic life (the default): a life lost ends the training episode; the game goes on
            rb.start_episode(obs[0])

        if global_step >= learning_starts and global_step % args.train_frequency == 0:
            batch = rb.sample(args.batch_size, args.n_step, rng)
            batch = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
            stats = train_step(q_network, target_network, optimizer, batch, args.gamma, args.tau, args.target)
            if global_step % (args.log_frequency * args.train_frequency) == 0:
                loss = stats["loss"].item()
                if not np.isfinite(loss):
                    raise SystemExit(
                        f"error: the TD loss is {loss} at step {global_step}: training diverged; "
                        "try a smaller --learning-rate or a larger --tau"
                    )
                writer.add_scalar("losses/td_loss", loss, global_step)
                writer.add_scalar("losses/q_values", stats["q_values"].item(), global_step)
                writer.add_scalar("losses/target_values", stats["target_values"].item(), global_step)
                sps = int((global_step - start_step) / (time.time() - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)
            if global_step % args.target_network_frequency == 0:
                target_network.load_state_dict(q_network.state_dict())

        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            video = f"videos/{run_name}" if args.capture_video else None  # one file per evaluation
            returns, lengths = evaluate_policy(
                q_network,
                game,
                args.eval_episodes,
                args.eval_epsilon,
                args.seed + 10_000,
                device,
                args.sticky_actions,
                video,
                args.max_episode_frames,
                f"eval-step-{global_step + 1}",
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            writer.add_scalar("eval/episodic_length", lengths.mean(), global_step)
            sps = int((global_step + 1 - start_step) / (time.time() - start_time))
            print(
                f"step {global_step + 1}/{args.total_timesteps}: eval return {returns.mean():.1f} "
                f"+- {returns.std():.1f} ({lengths.mean():.0f} steps a game), epsilon {epsilon:.3f}, SPS {sps}",
                flush=True,
            )

    if args.checkpoint_frequency:  # the end too, so that a finished run can be extended with --resume
        write_checkpoint(args.total_timesteps)
        print(f"checkpoint written to {checkpoint_path}")
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save({"args": vars(args), "q_network": q_network.state_dict()}, model_path)
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, None, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"reloaded model: eval return {returns.mean():.1f} +- {returns.std():.1f}")

    env.close()
    writer.close()
