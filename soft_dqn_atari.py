"""Soft Q-learning DQN on Atari: DQN with entropy- or KL-regularised ("soft") backups.

Schulman, Chen, Abbeel, "Equivalence Between Policy Gradients and Soft Q-Learning", 2017, Sec. 6.2
("a one-line change to a DQN implementation"). Docs: docs/soft_dqn.md. With LSE(s) = tau ln
sum_a exp(Q(s, a)/tau), the policy pi_Q = exp((Q - LSE)/tau), its entropy H and KL = ln|A| - H
to uniform, the backups (Eqs. 81-83, in the corrected form of Eqs. 39/45) are
  hard     y = r + gamma (1 - terminated) max_a' Q_bar(s', a')
  entropy  y = r + gamma (1 - terminated) LSE_Q_bar(s')
  kl       y = r + gamma (1 - terminated) (LSE_Q_bar(s') - tau ln|A|)
and with n-step returns (Eq. 46), j the steps to the window's or the episode's end,
  y_t = r_t + sum_{k=1}^{j-1} gamma^k (r_{t+k} + e(s_{t+k})) + gamma^j (1 - terminated) V(s_{t+j}),
e = tau H (entropy), -tau KL (kl), 0 (hard). The loss is the squared error to y. Settings follow
CleanRL's dqn_atari.py (Adam 1e-4, replay 1M, batch 32, a step every 4, target copy every 1000,
80k warm-up, epsilon 1 -> 0.01 over 10% of 10M steps, rewards clipped to their sign); tau = 0.1.
Atari is ale-py's vector env with DeepMind's preprocessing; the replay stores each frame once.

    python soft_dqn_atari.py --env-id BreakoutNoFrameskip-v4 --target entropy
    python soft_dqn_atari.py --env-id ALE/Pong-v5 --target kl --n-step 3
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    env_id: str = "BreakoutNoFrameskip-v4"
    """the Atari game: BreakoutNoFrameskip-v4, ALE/Breakout-v5 or breakout all mean Breakout"""
    total_timesteps: int = 10000000  # total timesteps of the experiments (4 frames each)
    learning_rate: float = 1e-4  # the learning rate of the Adam optimizer
    buffer_size: int = 1000000  # the replay memory buffer size (transitions)
    gamma: float = 0.99  # the discount factor gamma
    target: Literal["hard", "entropy", "kl"] = "entropy"
    """the backup: `hard` (DQN), `entropy` (soft Q, entropy bonus), `kl` (soft Q, KL to uniform)"""
    tau: float = 0.1  # the temperature tau of the soft targets (on the clipped-reward scale)
    n_step: int = 1  # n of the n-step return (Eq. 46)
    target_network_frequency: int = 1000  # copy the Q-network into the target every this many
    batch_size: int = 32  # the size of a batch sampled from the replay memory
    start_e: float = 1.0  # the starting epsilon for exploration
    end_e: float = 0.01  # the ending epsilon for exploration
    exploration_fraction: float = 0.10  # the fraction of the run it takes from start-e to end-e
    boltzmann: bool = False
    """act by sampling the Boltzmann policy pi_Q (temperature tau) instead of epsilon-greedy"""
    learning_starts: int = 80000  # timestep to start learning
    train_frequency: int = 4  # the frequency of training (env steps per gradient step)
    sticky_actions: bool = False
    """repeat the previous action with probability 0.25 (ALE v5); off in the paper's setting"""
    episodic_life: bool = True
    """a life lost ends the training episode (not the logged game), as DeepMind and CleanRL"""
    max_episode_frames: int = 108000
    """truncate episodes after this many frames (ALE's 30 minutes; truncations still bootstrap)"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 250000  # run evaluation episodes every this many steps
    eval_episodes: int = 10  # the number of evaluation episodes (epsilon = eval-epsilon)
    eval_epsilon: float = 0.001  # epsilon of the evaluation episodes
    log_frequency: int = 100  # log losses every this many gradient steps
    save_model: bool = False  # save the model into runs/{run_name}, then reload and evaluate it
    checkpoint_frequency: int = 0
    """checkpoint the learner every this many steps; 0: only on SIGTERM or Ctrl-C. A resumed run
    starts new games (ale-py's vector env cannot save its emulators)"""
    checkpoint_buffer: bool = False
    """put the replay buffer in checkpoints too (7 GB at 1M frames); without it a resumed run
    refills the buffer for --learning-starts steps before training"""
    resume: str | None = None
    """continue the run of this checkpoint (or run folder); only
    --total-timesteps, --checkpoint-frequency, --checkpoint-buffer, --stop-at, --cuda may change"""
    stop_at: int | None = None  # checkpoint and exit at this step (a chunk of a longer run)
    eval_model: str | None = None  # evaluate this saved model or checkpoint, and exit
    capture_video: bool = False  # videos of the evaluation episodes into videos/ (needs moviepy)
    track: bool = False  # track the run with Weights and Biases (needs wandb)
    wandb_project_name: str = "entropy-rl"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project


def atari_game(env_id: str) -> str:
    """The ALE game name of an Atari env id, or a one-line error for anything else."""
    import ale_py

    m = re.fullmatch(r"(?:ALE/)?([A-Za-z]+?)(?:NoFrameskip)?(?:-ram)?(?:-v\d+)?", env_id)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower() if m else ""
    roms = set(ale_py.roms.get_all_rom_ids())
    if "-ram" in env_id or snake not in roms:
        raise SystemExit(
            f"error: {env_id} is not an Atari game with image observations and discrete actions; "
            "use an id like BreakoutNoFrameskip-v4 or ALE/Pong-v5; no script here takes other "
            "discrete envs (CartPole, ...); continuous control: xql_sac.py"
        )
    return snake


def make_env(game: str, num_envs: int, seed: int, sticky: bool, episodic_life: bool,
             max_frames: int = 108000, rgb: bool = False):  # fmt: skip
    """ale-py's C++ vector env with DeepMind's preprocessing; rewards unclipped (clipped to train).
    rgb=True: the same env showing the game's 210x160 colour screen (videos; fed the same actions
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


class FrameReplayBuffer:
    """Frames in one circular array; transitions keep the absolute index of their newest frame.

    An episode writes its reset stack (4 frames), then one frame per step (the true last frame too),
    so the stack of any stored state is 4 consecutive frames of one episode. A transition whose
    oldest frame has been overwritten is never sampled."""

    ARRAYS = ("frames", "newest", "actions", "rewards", "dones", "ends")

    def __init__(self, capacity: int, stack: int = 4, frame_shape=(84, 84)):
        self.capacity, self.stack = capacity, stack
        self.frames = np.zeros((capacity, *frame_shape), dtype=np.uint8)
        self.frame_count = 0  # frames written so far (absolute)
        self.newest = np.zeros(capacity, dtype=np.int64)  # absolute index of s_t's newest frame
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=bool)  # s_{t+1} is terminal: no bootstrap
        self.ends = np.zeros(capacity, dtype=bool)  # s_{t+1} ends the episode (either way)
        self.count = 0  # transitions written so far (absolute)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in self.ARRAYS)

    def state_dict(self) -> dict:
        """Tensors sharing the arrays' memory: torch.save writes them apart (no 4 GB pickle cap)."""
        arrays = {k: torch.from_numpy(getattr(self, k)) for k in self.ARRAYS}
        return {"frame_count": self.frame_count, "count": self.count, **arrays}

    def load_state_dict(self, state: dict) -> None:
        self.frame_count, self.count = state["frame_count"], state["count"]
        for k in self.ARRAYS:
            getattr(self, k)[:] = state[k].numpy()

    def cut_episode(self) -> None:
        """End the stored episode as a truncation (its last next-frame is stored): a resumed run
        starts a new game, and no n-step window may run across into it."""
        if self.count:
            self.ends[(self.count - 1) % self.capacity] = True

    def _write_frame(self, frame) -> None:
        self.frames[self.frame_count % self.capacity] = frame
        self.frame_count += 1

    def start_episode(self, stack) -> None:
        for frame in stack:
            self._write_frame(frame)

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_frame):
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
        """Absolute ids t of transitions whose n-step window is stored, their frames intact."""
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


def soft_value(q: torch.Tensor, tau: float, target: str) -> torch.Tensor:
    """V(s) of each backup, computed with a stable log-sum-exp: max Q (hard), LSE (entropy),
    LSE - tau ln|A| = tau ln mean exp(Q/tau) (kl, Eq. 29)."""
    if target == "hard":
        return q.max(-1).values
    lse = tau * torch.logsumexp(q / tau, dim=-1)
    return lse if target == "entropy" else lse - tau * np.log(q.shape[-1])


def regularizer(q: torch.Tensor, tau: float, target: str) -> torch.Tensor:
    """e(s) of Eq. 46: tau H(pi_Q) (entropy), -tau KL(pi_Q || uniform) = -tau (ln|A| - H), 0."""
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
    ends_f = ends.to(rewards.dtype)
    ended_before = torch.cumsum(ends_f, dim=1) - ends_f  # ends among k' < k
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
def target_q_next(target_network: QNetwork, next_obs, ends, target: str) -> torch.Tensor:
    """Q_bar(s_{t+k+1}) for k < n, (B, n, |A|), as nstep_target takes it (Eq. 46). The hard target
    has no regulariser (e = 0), so only its bootstrap state s_{t+j} is evaluated and the other rows,
    which nstep_target masks, are left 0: n times fewer forward passes."""
    B, n = ends.shape
    if target != "hard" or n == 1:
        return target_network(next_obs.flatten(0, 1)).view(B, n, -1)
    j = torch.where(ends.any(1), ends.int().argmax(1), n - 1)  # the first end, else the last step
    rows = torch.arange(B, device=ends.device)
    q_boot = target_network(next_obs[rows, j])
    q_next = q_boot.new_zeros(B, n, q_boot.shape[-1])
    q_next[rows, j] = q_boot
    return q_next


def td_loss(q_sa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The squared error of Q(s_t, a_t) to the n-step target (CleanRL's; Nature DQN: Huber)."""
    return F.mse_loss(q_sa, y)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


@torch.no_grad()
def act(q_network, obs: np.ndarray, epsilon: float, n_actions: int, rng, device, tau=None):
    """Actions for a (N,4,84,84) batch: epsilon-greedy, or with `tau` drawn from softmax(Q/tau)."""
    q = q_network(torch.as_tensor(obs, device=device))
    if tau is not None:
        return torch.distributions.Categorical(logits=q / tau).sample().cpu().numpy()
    greedy = q.argmax(1).cpu().numpy()
    explore = rng.random(len(greedy)) < epsilon
    return np.where(explore, rng.integers(0, n_actions, len(greedy)), greedy)


def update(batch: dict, learner: dict, args: Args) -> dict:
    """One gradient step of the n-step TD loss on a sampled batch, the target network's Q in the
    target. Returns the loss and estimates to log, detached."""
    q_network = learner["q_network"]
    device = next(q_network.parameters()).device
    b = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    with torch.no_grad():
        q_next = target_q_next(learner["target_network"], b["next_obs"], b["ends"], args.target)
        y = nstep_target(b["rewards"], b["dones"], b["ends"], q_next, args.gamma, args.tau,
                         args.target)
    q_sa = q_network(b["obs"]).gather(1, b["actions"].unsqueeze(1)).squeeze(1)
    loss = td_loss(q_sa, y)
    learner["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    learner["optimizer"].step()
    return dict(loss=loss.detach(), q_sa=q_sa.detach(), y=y)


def train(args: Args) -> None:
    args, run, env, rb = start_run(args)  # --eval-model; resume, checks, env, writer, buffer...
    device, rng, n_actions = run.device, run.rng, env.single_action_space.n
    q_network = QNetwork(n_actions).to(device)
    target_network = QNetwork(n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    # fused Adam: one kernel for all parameters
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    learner = dict(q_network=q_network, target_network=target_network, optimizer=optimizer)
    # the first gradient step: later on a resume without the buffer, which refills it first
    updates_start = run.restore(learner, rb)
    obs, _ = env.reset(seed=args.seed + run.start_step)
    rb.start_episode(obs[0])
    game_return, game_length = 0.0, 0
    for global_step in range(run.start_step, args.total_timesteps):
        run.stop_if_asked(global_step, learner, rb)  # SIGTERM, Ctrl-C, --stop-at: checkpoint, exit
        duration = int(args.exploration_fraction * args.total_timesteps)
        epsilon = linear_schedule(args.start_e, args.end_e, duration, global_step)
        # uniform random in the warm-up, as baselines' DQN; CleanRL acts epsilon-greedy from the
        # start instead, almost the same (epsilon > 0.92 over the default warm-up)
        if global_step < args.learning_starts and not args.boltzmann:
            action = rng.integers(0, n_actions, 1)
        else:
            tau = args.tau if args.boltzmann else None
            action = act(q_network, obs, epsilon, n_actions, rng, device, tau)
        next_obs, reward, terminated, truncated, info = env.step(action)
        # train on the clipped reward; log the game's own
        clipped = float(np.sign(reward[0]))
        rb.add(int(action[0]), clipped, bool(terminated[0]), bool(truncated[0]), next_obs[0, -1])
        game_return += float(reward[0])
        game_length += 1
        obs = next_obs
        lost_all = not args.episodic_life or info["lives"][0] == 0
        if truncated[0] or (terminated[0] and lost_all):  # the game is over
            run.log_game(game_return, game_length, epsilon, global_step)
            game_return, game_length = 0.0, 0
            obs, *_ = env.step(np.zeros(1, dtype=np.int64))  # NEXT_STEP autoreset: this call resets
            rb.start_episode(obs[0])
        elif terminated[0]:  # episodic life: a life lost ends the training episode, not the game
            rb.start_episode(obs[0])

        if global_step >= updates_start:
            if global_step % args.train_frequency == 0:
                logs = update(rb.sample(args.batch_size, args.n_step, rng), learner, args)
                log_update(run, logs, args, rb, n_actions, global_step)  # stops a diverging run
            if global_step % args.target_network_frequency == 0:
                target_network.load_state_dict(q_network.state_dict())

        if run.evaluation_due(global_step + 1):  # epsilon-greedy at --eval-epsilon
            run.evaluate(global_step, q_network, epsilon)
        run.step_done(global_step + 1, learner, rb)  # periodic checkpoint, progress line
    run.finish({"q_network": q_network.state_dict()})


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
        (args.total_timesteps >= 1, f"--total-timesteps must be >= 1 (got {args.total_timesteps})"),
        (step < args.total_timesteps,
         f"the run in {args.resume} is complete ({step} steps); extend it with --total-timesteps"),
        (args.target == "hard" or args.tau > 0,
         f"--tau must be > 0 with --target {args.target} (got {args.tau}); the paper uses 0.1"),
        (not args.boltzmann or args.tau > 0, f"--boltzmann needs --tau > 0 (got {args.tau})"),
        (args.n_step >= 1, f"--n-step must be at least 1 (got {args.n_step})"),
        (min(args.batch_size, args.train_frequency) > 0 and args.buffer_size >= 4 * args.batch_size,
         "--batch-size and --train-frequency must be positive and --buffer-size >= 4 x batch"),
        (args.eval_frequency >= 1, f"--eval-frequency must be >= 1 (got {args.eval_frequency})"),
        (args.learning_starts < args.total_timesteps,
         f"--learning-starts {args.learning_starts} >= --total-timesteps: no gradient step"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")
    if args.capture_video:
        check_video_prerequisites()


def start_run(args: Args):
    """The run's set-up before any network: --eval-model evaluates and exits here; else the flags
    of a checkpoint with --resume, the checks, the env, a Run (name, writer, seeds...) and the
    replay buffer, as long as the run at most (a resumed buffer keeps its size)."""
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        video = "videos/eval" if args.capture_video else None
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", video)
        print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    game, start_step = atari_game(args.env_id), checkpoint["global_step"] if checkpoint else 0
    # a resumed run starts new games, seeded by the step it resumes at
    env = make_env(game, 1, args.seed + start_step, args.sticky_actions, args.episodic_life,
                   args.max_episode_frames)
    run = Run(args, checkpoint, game, env)
    # --tau is the soft targets' temperature here; CleanRL's dqn_atari.py's is the target update's
    target_name = "hard" if args.target == "hard" else f"{args.target} (temperature {args.tau})"
    saved_rb = checkpoint and checkpoint["rb"]  # a resumed buffer keeps its size
    capacity = min(args.buffer_size, args.total_timesteps + 4)
    capacity = len(saved_rb["actions"]) if saved_rb else capacity
    rb = FrameReplayBuffer(capacity)
    capped = f" (the run's length, not {args.buffer_size})" if capacity < args.buffer_size else ""
    # printed by Run.restore, just before the loop
    run.banner = (
        f"{SCRIPT}: {game}, {env.single_action_space.n} actions, target {target_name}, "
        f"{args.n_step}-step; replay buffer {rb.capacity} frames{capped} = "
        f"{rb.nbytes / 2**30:.2f} GiB; {run.device}; runs/{run.name}"
    )
    return args, run, env, rb


def log_update(run: "Run", logs: dict, args: Args, rb, n_actions: int, step: int) -> None:
    """Every --log-frequency gradient steps: stop a run whose loss is not finite or whose values
    run away, and log the last update's loss and estimates."""
    if step % (args.log_frequency * args.train_frequency) != 0:
        return
    if not torch.isfinite(logs["loss"]):
        sys.exit(f"error: the TD loss is not finite at {step}: raise --tau")
    bonus = args.tau * np.log(n_actions) if args.target != "hard" else 0.0  # |e(s)| <= tau ln|A|
    check_values(logs["q_sa"], np.abs(rb.rewards).max(), args.gamma, bonus, step)
    run.log(dict(td_loss=logs["loss"].item(), q_values=logs["q_sa"].mean().item(),
                 target_values=logs["y"].mean().item()), step)


def check_values(q, max_reward: float, gamma: float, bonus: float, step: int) -> None:
    """Stop a run whose values run away with a finite loss: mean |Q| over ten times
    (max |r| + bonus)/(1 - gamma), the largest discounted return; bonus: a step's largest |e(s)|."""
    bound = (float(max_reward) + bonus) / max(1.0 - gamma, 1e-8)
    if 0 < 10 * bound < (mean := q.abs().mean().item()):
        sys.exit(f"error: the values diverged at step {step} (mean |Q| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a larger --tau or a smaller --learning-rate")


def check_video_prerequisites() -> None:
    """Videos are written with moviepy: say so at start, not at the first evaluation."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        sys.exit("error: --capture-video needs moviepy: pip install moviepy")


def evaluate_policy(q_network, game: str, n_episodes: int, epsilon: float, seed: int, device,
                    sticky=False, video_folder=None, max_frames=108000, video_name="eval"):
    """Game returns (unclipped, whole games) of epsilon-greedy episodes, and their lengths in agent
    steps. A greedy policy that never presses FIRE after a life lost waits, in Breakout, until an
    epsilon action or the frame cap launches the ball: long games of low return. With a video
    folder, the first game is saved as `video_name`-episode-0.mp4 in colour: a twin env with the
    same seed, fed the same actions, shows the screen the network sees in 84x84 grey."""
    env = make_env(game, 1, seed, sticky, episodic_life=False, max_frames=max_frames)
    twin = make_env(game, 1, seed, sticky, False, max_frames, rgb=True) if video_folder else None
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = [twin.reset(seed=seed)[0][0, -1]] if twin else []
    returns, lengths, ret, length = [], [], 0.0, 0
    while len(returns) < n_episodes:
        action = act(q_network, obs, epsilon, env.single_action_space.n, rng, device)
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


def evaluate(path: str, eval_episodes=10, seed=0, device="cpu", video_folder=None, max_frames=None):
    """Evaluation game returns of a saved model or checkpoint; the game, the evaluation epsilon and
    the episode cap come from the file, `max_frames` overrides the cap."""
    saved = load_checkpoint(path, "--eval-model")
    if video_folder:
        check_video_prerequisites()
    game, args = atari_game(saved["args"]["env_id"]), saved["args"]
    max_frames = args["max_episode_frames"] if max_frames is None else max_frames
    q_network = QNetwork(make_env(game, 1, seed, False, False).single_action_space.n).to(device)
    q_network.load_state_dict(saved["q_network"])
    epsilon, sticky = args["eval_epsilon"], args["sticky_actions"]
    device = torch.device(device)
    returns, _ = evaluate_policy(q_network, game, eval_episodes, epsilon, seed, device, sticky,
                                 video_folder, max_frames)  # fmt: skip
    return returns


class Run:
    """The run-keeping half of train(): the run's name, stop signals, writer and seeds, then its
    checkpoints, logs of games and updates, evaluations, the progress line and the saved model."""

    def __init__(self, args: Args, checkpoint: dict | None, game: str, env):
        name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.args, self.checkpoint, self.game, self.env = args, checkpoint, game, env
        self.name = checkpoint["run_name"] if checkpoint else name
        self.path = f"runs/{self.name}/checkpoint.pt"
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
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.rng = np.random.default_rng(args.seed)  # the acting and sampling generator
        self.start_step, self.last_return = 0, None

    def restore(self, learner: dict, rb: FrameReplayBuffer) -> int:
        """Load a checkpoint's learner, random states and, if saved, the replay buffer (its stored
        episode cut: the resumed run starts new games); the step of the first gradient step."""
        print(self.banner)
        updates_start = self.args.learning_starts
        if ckpt := self.checkpoint:
            for key, x in learner.items():  # networks and optimizer
                x.load_state_dict(ckpt[key])
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.rng.bit_generator.state = ckpt["rng"]["act"]
            if ckpt["rb"] is not None:
                rb.load_state_dict(ckpt["rb"])
                rb.cut_episode()
            # without its buffer a resumed run refills it first, acting with its policy
            self.start_step = ckpt["global_step"]
            updates_start += 0 if ckpt["rb"] is not None else self.start_step
            how = "restored" if ckpt["rb"] is not None else f"refilled to step {updates_start}"
            print(f"resumed {self.args.resume} at step {self.start_step} of "
                  f"{self.args.total_timesteps}, new games; buffer {how}")
            self.checkpoint = None  # its copy of the buffer can be large
        self.progress = Progress(self.args.total_timesteps, self.start_step)
        self.start_time = time.time()
        return updates_start

    def save(self, step: int, learner: dict, rb: FrameReplayBuffer) -> None:
        """The learner before step `step`, the random states and, with --checkpoint-buffer, the
        replay buffer (not the games in progress); written to a temporary file, then renamed: a
        kill mid-write leaves the last checkpoint whole."""
        rng = dict(python=random.getstate(), numpy=np.random.get_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        rng.update(torch=torch.get_rng_state(), cuda=cuda, act=self.rng.bit_generator.state)
        state = {k: x.state_dict() for k, x in learner.items()}
        state["rb"] = rb.state_dict() if self.args.checkpoint_buffer else None
        meta = dict(script=SCRIPT, args=vars(self.args), run_name=self.name, global_step=step)
        torch.save({**meta, "rng": rng, **state}, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def stop_if_asked(self, step: int, learner: dict, rb: FrameReplayBuffer) -> None:
        if self.signals or step == self.args.stop_at:  # checkpoint as before `step`, and exit
            self.save(step, learner, rb)
            why = f"signal {self.signals[0]}" if self.signals else "--stop-at"
            self.progress.print(f"stopped by {why} at step {step}; --resume {self.path}")
            sys.exit(128 + self.signals[0] if self.signals else 0)

    def log_game(self, game_return: float, game_length: int, epsilon: float, step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", game_return, step)
        self.last_return = game_return
        self.writer.add_scalar("charts/episodic_length", game_length, step)
        self.writer.add_scalar("charts/epsilon", epsilon, step)

    def log(self, scalars: dict, step: int) -> None:  # an update's loss and estimates, and SPS
        for tag, value in scalars.items():
            self.writer.add_scalar(f"losses/{tag}", value, step)
        self.writer.add_scalar("charts/SPS", self.sps(step), step)

    def sps(self, steps: int) -> int:
        return int((steps - self.start_step) / (time.time() - self.start_time))

    def evaluation_due(self, steps: int) -> bool:
        return steps % self.args.eval_frequency == 0 or steps == self.args.total_timesteps

    def evaluate(self, step: int, q_network, epsilon: float) -> None:
        """Evaluate at --eval-epsilon on new games; log the mean game return and length."""
        args = self.args
        video = f"videos/{self.name}" if args.capture_video else None  # one file per evaluation
        returns, lengths = evaluate_policy(
            q_network, self.game, args.eval_episodes, args.eval_epsilon, args.seed + 10_000,
            self.device, args.sticky_actions, video, args.max_episode_frames,
            f"eval-step-{step + 1}",
        )  # fmt: skip
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.writer.add_scalar("eval/episodic_length", lengths.mean(), step)
        self.progress.print(f"step {step + 1}: eval return {returns.mean():.1f} +- "
                            f"{returns.std():.1f} ({lengths.mean():.0f} steps a game), "
                            f"epsilon {epsilon:.3f}, SPS {self.sps(step + 1)}")

    def step_done(self, steps: int, learner: dict, rb: FrameReplayBuffer) -> None:
        every, end = self.args.checkpoint_frequency, steps == self.args.total_timesteps
        if every and (steps % every == 0 or end):
            self.save(steps, learner, rb)
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


RESUME_FLAGS = ("total_timesteps", "checkpoint_frequency", "checkpoint_buffer", "stop_at", "cuda")
RESUME_FLAGS += ("track",)


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
