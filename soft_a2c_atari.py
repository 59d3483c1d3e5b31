"""Entropy-regularised A2C (naive or proper) and its soft Q-learning twin, on Atari, single file.

Paper: Schulman, Chen, Abbeel, "Equivalence Between Policy Gradients and Soft Q-Learning", 2017,
Sections 6.1 and 6.3. Docs: docs/soft_a2c.md.

One network (Nature CNN torso, a policy head and a value head), 16 envs x 5-step rollouts. For a
regulariser with temperature tau, a per-state penalty p(s) = KL(pi || uniform) (`--regularizer kl`)
or -H(pi) (`--regularizer entropy`); the two differ by the constant ln|A|.

`--update pg` (A2C, Section 6.1). Each step t of a rollout of length T bootstraps at the end:
    R_t = sum_{k=0}^{T-t-1} gamma^k r~_{t+k} + gamma^{T-t} V(s_T)         (masked by episode ends)
  naive  (Eq. 79): r~ = r; loss -ln pi(a_t|s_t) (R_t - V(s_t)) + tau p(s_t) + c 1/2 (V(s_t) - R_t)^2
  proper (Eq. 80): r~_{t+k} = r_{t+k} - tau p(s_{t+k}) inside R_t (detached), V fitted to that
                   return; only the explicit tau p(s_t) carries a gradient. "EntRL" (Fig. 1) is
                   proper with the entropy bonus.
`--update soft-q` (Section 6.3): the same network, rollouts and acting with pi_theta, no target
network and no epsilon, trained by 1/2 (Q_theta(s_t, a_t) - y_t)^2 with
    Q_theta(s, a) = V_theta(s) + tau ln(pi_theta(a|s) / pi_bar(a))      (kl; Eq. 57)
                  = V_theta(s) + tau ln pi_theta(a|s)                    (entropy)
    y_t = r_t + sum_{k=1}^{T-t-1} gamma^k (r_{t+k} - tau p(s_{t+k})) + gamma^{T-t} V(s_T)   (Eq. 47, detached)
  Eq. 65: its expected gradient is tau * grad L_policy + grad L_value (A2C proper with value weight
  1/tau). To match A2C's c = 0.5, the gradient entering the advantage stream tau ln pi is scaled by
  1/tau and the one entering the value stream by c (`--adv-grad-scale`, `--value-grad-scale`; the
  paper prints "1/epsilon", a typo); the expected gradient is then grad L_policy + c grad L_value.

Terminations stop bootstrapping; time-limit truncations bootstrap from V of the true last
observation (ale-py's vector env returns it as info["final_obs"]). A2C settings (Section 6.1):
RMSprop lr 7e-4 (alpha 0.99, eps 1e-5) decaying linearly to 0, tau = 0.01, c = 0.5, gradient-norm
clip 0.5, gamma 0.99. Rewards are clipped to their sign for training; the logged returns are the
game's own. Evaluation episodes sample from pi (a greedy Breakout agent that never presses FIRE
after losing a life would never end).

Atari: ale-py's C++ vector env (`AtariVectorEnv`) does DeepMind's preprocessing (no-op starts,
frame skip 4 with max-pooling, 84x84 grayscale, 4-frame stack, fire on reset) in parallel threads,
without OpenCV; it is the fast choice on a CPU. Training episodes end at a life loss (DeepMind's
episodic life, as OpenAI's A2C, CleanRL and SB3 train; the game goes on); the logged returns and the
evaluation are whole games. Sticky actions are a flag.

Usage:
    python soft_a2c_atari.py --env-id BreakoutNoFrameskip-v4 --objective proper --regularizer kl
    python soft_a2c_atari.py --env-id BreakoutNoFrameskip-v4 --update soft-q
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
    """total timesteps of the experiments (agent steps over all envs; 4 frames each)"""
    learning_rate: float = 7e-4
    """the learning rate of the RMSprop optimizer"""
    anneal_lr: bool = True
    """toggle linear decay of the learning rate to 0"""
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 5
    """the number of steps of each rollout per environment"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.01
    """the regularisation temperature tau"""
    objective: Literal["naive", "proper"] = "proper"
    """`naive` (Eq. 79: penalty only at s_t) or `proper` (Eq. 80: penalties inside the return too)"""
    regularizer: Literal["kl", "entropy"] = "kl"
    """`kl` (KL to the uniform policy) or `entropy` (entropy bonus)"""
    update: Literal["pg", "soft-q"] = "pg"
    """`pg` (A2C) or `soft-q` (Section 6.3's soft Q-learning with Q = V + tau ln pi)"""
    vf_coef: float = 0.5
    """value coefficient c of A2C"""
    adv_grad_scale: float | None = None
    """soft-q: scale of the gradient into the advantage stream tau ln pi (default 1/tau)"""
    value_grad_scale: float = 0.5
    """soft-q: scale of the gradient into the value stream (c, to match A2C)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    rms_alpha: float = 0.99
    """RMSprop decay"""
    rms_eps: float = 1e-5
    """RMSprop epsilon"""
    sticky_actions: bool = False
    """repeat the previous action with probability 0.25 (ALE v5)"""
    episodic_life: bool = True
    """end training episodes (not the logged games) at a life loss, the game going on (DeepMind's, as
    OpenAI's A2C and CleanRL train); --no-episodic-life trains on whole games"""
    max_episode_frames: int = 108000
    """truncate episodes after this many frames (truncations still bootstrap)"""
    eval_frequency: int = 500000
    """run evaluation episodes every this many steps"""
    eval_episodes: int = 10
    """the number of evaluation episodes (actions sampled from pi)"""
    log_frequency: int = 100
    """log losses every this many updates"""
    checkpoint_frequency: int = 0
    """write runs/{run_name}/checkpoint.pt about every this many agent steps and at the end (0: only when
    stopped by SIGTERM or SIGINT): network, optimizer, random states and counters (about 20 MB). A
    resumed run starts new games (ale-py's vector env cannot save its emulators)"""
    resume: str | None = None
    """continue the run saved in this checkpoint, logging to the same TensorBoard run; its flags are
    reused, and only --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
    stop_at: int | None = None
    """checkpoint and exit at the first update boundary at or after this agent step: one chunk of a longer
    run (a job time limit), continued with --resume; the learning-rate schedule still spans --total-timesteps"""
    eval_model: str | None = None
    """evaluate this saved model or checkpoint (the game comes from the file) for --eval-episodes
    episodes, with --capture-video if given, and exit"""


def check_args(args: Args) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    if not args.tau > 0:
        raise SystemExit(f"error: --tau must be > 0 (got {args.tau}); the paper uses 0.01")
    if args.num_envs < 1:
        raise SystemExit(f"error: --num-envs must be at least 1 (got {args.num_envs}); the paper uses 16")
    if args.num_steps < 1:
        raise SystemExit(f"error: --num-steps must be at least 1 (got {args.num_steps}); A2C uses 5")
    if args.total_timesteps < args.num_envs * args.num_steps:
        raise SystemExit(
            f"error: --total-timesteps {args.total_timesteps} < one rollout of --num-envs x --num-steps = "
            f"{args.num_envs * args.num_steps} agent steps: no update would run; raise --total-timesteps"
        )
    if args.eval_frequency < 1:
        raise SystemExit(f"error: --eval-frequency must be >= 1 (got {args.eval_frequency}); it is in agent steps")
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
    if "-ram" in env_id or snake not in set(ale_py.roms.get_all_rom_ids()):
        raise SystemExit(
            f"error: {env_id} is not an Atari game with image observations and discrete actions; "
            "use an id like BreakoutNoFrameskip-v4 or ALE/Pong-v5 (continuous control: xql_sac.py, iq_continuous.py)"
        )
    return snake


def make_env(
    game: str, num_envs: int, seed: int, sticky: bool, episodic_life: bool, max_frames: int = 108000, rgb: bool = False
):
    """ale-py's C++ vector env with DeepMind's preprocessing; unclipped rewards; same-step autoreset
    (the returned observation is the reset one, the true last one is in info["final_obs"]).
    rgb=True: the same env showing the game's 210x160 colour screen (for videos; fed the same actions
    with the same seed it plays the same game)."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(
        game,
        num_envs=num_envs,
        num_threads=min(num_envs, os.cpu_count() or 1),
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
        autoreset_mode="SameStep",
    )
    env.action_space.seed(seed)
    return env


class Agent(nn.Module):
    """Nature CNN torso shared by a policy head (|A| logits) and a value head."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.torso = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
        )
        self.policy = nn.Linear(512, n_actions)
        self.value = nn.Linear(512, 1)
        # A2C's init (as in OpenAI baselines and CleanRL): orthogonal, gain sqrt(2) for ReLU layers, 0.01
        # for the policy (pi starts uniform), 1 for the value; zero biases. With PyTorch's default init,
        # 92% of the 512 hidden units were dead after 60k Breakout steps and V was flat across states
        # (explained variance 0): pi never left uniform. With this init: 40% and 0.98.
        for layer in [*self.torso, self.policy, self.value]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                gain = 0.01 if layer is self.policy else 1.0 if layer is self.value else np.sqrt(2)
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor):
        h = self.torso(x.to(self.value.weight.dtype) / 255.0)
        return self.policy(h), self.value(h).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Returns and losses (pure functions: tensors in, tensors out)
# ---------------------------------------------------------------------------------------------
def penalty(logits: torch.Tensor, regularizer: str) -> torch.Tensor:
    """p(s) of Eqs. 79/80: KL(pi || uniform) = ln|A| - H(pi) (kl, Eq. 29's prior) or -H(pi) (entropy);
    tau * p(s) is the loss term, -tau * p(s) the reward shaping of the proper return."""
    log_pi = torch.log_softmax(logits, -1)
    neg_entropy = (log_pi.exp() * log_pi).sum(-1)
    return neg_entropy + np.log(logits.shape[-1]) if regularizer == "kl" else neg_entropy


def nstep_returns(rewards, penalties, dones, ends, next_values, final_values, gamma: float, tau: float, kind: str):
    """(T, N) returns of a rollout. rewards[t], penalties[t] = p(s_t) (detached), dones[t] / ends[t]: s_{t+1}
    is terminal / ends the episode; next_values: V(s_T) (N,); final_values[t]: V of the true last
    observation where a truncation ended the episode at s_{t+1}.
      kind "naive":  R_t = sum_k gamma^k r_{t+k} + gamma^{T-t} V(s_T)                    (Eq. 79)
      kind "proper": r~_{t+k} = r_{t+k} - tau p(s_{t+k}) for every k >= 0                 (Eq. 80)
      kind "soft-q": the proper return plus tau p(s_t): the penalty at s_t cancels         (Eq. 47)"""
    T = rewards.shape[0]
    returns = torch.zeros_like(rewards)
    R = next_values
    shaped = rewards if kind == "naive" else rewards - tau * penalties
    for t in reversed(range(T)):
        bootstrap = (1.0 - ends[t]) * R + ends[t] * (1.0 - dones[t]) * final_values[t]
        R = shaped[t] + gamma * bootstrap
        returns[t] = R
    return returns + tau * penalties if kind == "soft-q" else returns


def weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if weights is None else (weights * x).sum() / weights.sum()


def a2c_loss(logits, values, actions, returns, tau: float, vf_coef: float, regularizer: str, weights=None):
    """A2C's loss (Eqs. 79/80, the returns decide which): -ln pi(a|s) (R - V) + tau p(s) + c 1/2 (V - R)^2.
    `weights` (optional, per sample) turns the mean into a weighted average (the tests use pi)."""
    log_pi_a = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantages = (returns - values).detach()
    policy_loss = weighted_mean(-log_pi_a * advantages + tau * penalty(logits, regularizer), weights)
    value_loss = weighted_mean(0.5 * (values - returns).pow(2), weights)
    return policy_loss + vf_coef * value_loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach()}


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass, scale * grad in the backward pass."""
    return x * scale + x.detach() * (1.0 - scale)


def soft_q_loss(
    logits,
    values,
    actions,
    targets,
    tau: float,
    regularizer: str,
    adv_grad_scale: float = 1.0,
    value_grad_scale: float = 1.0,
    weights=None,
):
    """Section 6.3: 1/2 (Q(s,a) - y)^2 with Q = V + tau ln(pi(a|s)/pi_bar(a)) (kl) or V + tau ln pi (entropy);
    the gradients into the advantage and value streams are scaled (1/tau and c match A2C)."""
    log_pi_a = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantage = tau * (log_pi_a + (np.log(logits.shape[-1]) if regularizer == "kl" else 0.0))
    q = scale_grad(values, value_grad_scale) + scale_grad(advantage, adv_grad_scale)
    loss = weighted_mean(0.5 * (q - targets).pow(2), weights)
    return loss, {"soft_q_loss": loss.detach()}


def update(agent: Agent, optimizer, rollout: dict, args) -> dict:
    """One update on a rollout: obs (T,N,4,84,84), actions, rewards, dones, ends (T,N), final_values (T,N),
    next_obs (N,4,84,84). `args` needs gamma, tau, objective, regularizer, update, vf_coef, adv_grad_scale,
    value_grad_scale, max_grad_norm."""
    T, N = rollout["actions"].shape
    logits, values = agent(rollout["obs"].flatten(0, 1))
    with torch.no_grad():
        next_values = agent(rollout["next_obs"])[1]
        penalties = penalty(logits.detach(), args.regularizer).view(T, N)
        kind = "soft-q" if args.update == "soft-q" else args.objective
        returns = nstep_returns(
            rollout["rewards"],
            penalties,
            rollout["dones"],
            rollout["ends"],
            next_values,
            rollout["final_values"],
            args.gamma,
            args.tau,
            kind,
        ).flatten()
    actions = rollout["actions"].flatten()
    if args.update == "soft-q":
        adv_scale = 1.0 / args.tau if args.adv_grad_scale is None else args.adv_grad_scale
        loss, stats = soft_q_loss(
            logits, values, actions, returns, args.tau, args.regularizer, adv_scale, args.value_grad_scale
        )
    else:
        loss, stats = a2c_loss(logits, values, actions, returns, args.tau, args.vf_coef, args.regularizer)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        log_pi = torch.log_softmax(logits, -1)
        entropy = -(log_pi.exp() * log_pi).sum(-1).mean()
        var_r = returns.var()
        stats.update(
            loss=loss.detach(),
            entropy=entropy,
            kl_to_uniform=np.log(logits.shape[-1]) - entropy,
            explained_variance=1 - (returns - values).var() / var_r if var_r > 0 else torch.tensor(0.0),
            values=values.mean(),
        )
    return stats


def evaluate_policy(
    agent: Agent,
    game: str,
    n_episodes: int,
    seed: int,
    device: torch.device,
    sticky: bool = False,
    max_frames: int = 108000,
    video_folder: str | None = None,
    video_name: str = "eval",
) -> np.ndarray:
    """Game returns (unclipped, whole games) of episodes acting with actions sampled from pi. With a
    video folder, the first game is saved as `video_name`-episode-0.mp4 in colour: a twin env with the
    same seed, fed the same actions, shows the screen the network sees in 84x84 grey."""
    env = make_env(game, 1, seed, sticky, episodic_life=False, max_frames=max_frames)
    twin = make_env(game, 1, seed, sticky, False, max_frames, rgb=True) if video_folder else None
    generator = torch.Generator(device=device).manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    frames = [twin.reset(seed=seed)[0][0, -1]] if twin else []
    returns, ret = [], 0.0
    while len(returns) < n_episodes:
        with torch.no_grad():
            logits, _ = agent(torch.as_tensor(obs, device=device))
            action = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
        ret += float(reward[0])
        if twin and not returns:
            frames.append(twin.step(action.cpu().numpy())[0][0, -1])
        if terminated[0] or truncated[0]:
            returns.append(ret)
            ret = 0.0
    env.close()
    if twin:
        twin.close()
        from gymnasium.utils.save_video import save_video

        save_video(frames, video_folder, fps=15, name_prefix=video_name)
    return np.array(returns)


def evaluate(
    model_path: str,
    env_id: str | None = None,
    eval_episodes: int = 10,
    seed: int = 0,
    device: str = "cpu",
    max_frames: int | None = None,
    video_folder: str | None = None,
) -> np.ndarray:
    """Evaluation game returns of a model written by --save-model or a checkpoint. The game and the
    episode cap come from the file unless given."""
    checkpoint = torch.load(model_path, map_location=device, weights_only=False)  # our own file: trusted
    saved = checkpoint["args"]
    game = atari_game(env_id or saved["env_id"])
    max_frames = saved["max_episode_frames"] if max_frames is None else max_frames
    n_actions = make_env(game, 1, seed, False, False).single_action_space.n
    if n_actions != checkpoint["n_actions"]:
        raise SystemExit(
            f"error: {model_path} was trained on {saved['env_id']} ({checkpoint['n_actions']} actions), not "
            f"{env_id} ({n_actions}); leave out the env id to use {saved['env_id']}"
        )
    agent = Agent(n_actions).to(device)
    agent.load_state_dict(checkpoint["agent"])
    return evaluate_policy(
        agent, game, eval_episodes, seed, torch.device(device), saved["sticky_actions"], max_frames, video_folder
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints: what a run needs to continue where it stopped (the games in progress start anew)
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
    envs = make_env(
        game, args.num_envs, args.seed + start_step, args.sticky_actions, args.episodic_life, args.max_episode_frames
    )
    n_actions = envs.single_action_space.n
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

    # on resume, purge_step hides what the stopped run logged after its checkpoint (taken after the
    # update that reached start_step had logged at start_step)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step + 1 if checkpoint else None)
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

    agent = Agent(n_actions).to(device)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    T, N = args.num_steps, args.num_envs
    rollout = {
        "obs": torch.zeros((T, N, 4, 84, 84), dtype=torch.uint8, device=device),
        "actions": torch.zeros((T, N), dtype=torch.long, device=device),
        **{k: torch.zeros((T, N), device=device) for k in ["rewards", "dones", "ends", "final_values"]},
    }
    num_updates = args.total_timesteps // (T * N)
    print(
        f"{args.exp_name}: {game}, {n_actions} actions, {N} envs x {T} steps, update {args.update}, objective "
        f"{args.objective}, regularizer {args.regularizer}, tau={args.tau}; device={device}; logging to runs/{run_name}"
    )
    print(f"--tau {args.tau} is the regularisation temperature (the role of CleanRL's --ent-coef)")
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    print(
        f"checkpoints go to {checkpoint_path} "
        f"({f'every {args.checkpoint_frequency} steps' if args.checkpoint_frequency else 'on SIGTERM/SIGINT only'})"
    )

    def write_checkpoint(iteration: int) -> None:
        """What the next update (number `iteration` + 1) depends on, but the games in progress."""
        save_checkpoint(
            checkpoint_path,
            {
                "args": vars(args),
                "run_name": run_name,
                "n_actions": int(n_actions),
                "iteration": iteration,
                "global_step": global_step,
                "next_eval": next_eval,
                "agent": agent.state_dict(),  # --eval-model reads this, as in a saved model
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
            },
        )

    stop_signals = []

    def request_stop(signum, frame):
        """SIGTERM (Slurm, a job's time limit) or Ctrl-C: checkpoint after this update, then exit."""
        if stop_signals:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop_signals.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    global_step, next_eval, start_iteration = 0, args.eval_frequency, 1
    if checkpoint:
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        global_step, next_eval = checkpoint["global_step"], checkpoint["next_eval"]
        start_iteration = checkpoint["iteration"] + 1
        print(f"resumed {args.resume} at step {global_step} of {args.total_timesteps}, new games")

    # checkpoints at the first update boundary at or after each multiple of --checkpoint-frequency
    next_checkpoint = (
        (global_step // args.checkpoint_frequency + 1) * args.checkpoint_frequency if args.checkpoint_frequency else 0
    )
    start_time = time.time()
    obs, reset_info = envs.reset(seed=args.seed + start_step)
    obs = torch.as_tensor(obs, device=device)
    lives = reset_info["lives"]
    game_returns, game_lengths = np.zeros(N), np.zeros(N, dtype=np.int64)
    for iteration in range(start_iteration, num_updates + 1):
        if stop_signals or (args.stop_at is not None and global_step >= args.stop_at and global_step > start_step):
            write_checkpoint(iteration - 1)
            why = f"signal {stop_signals[0]}" if stop_signals else "--stop-at"
            print(f"stopped by {why} at step {global_step}; continue with --resume {checkpoint_path}")
            sys.exit(128 + stop_signals[0] if stop_signals else 0)
        if args.checkpoint_frequency and global_step >= next_checkpoint:
            next_checkpoint = (global_step // args.checkpoint_frequency + 1) * args.checkpoint_frequency
            write_checkpoint(iteration - 1)
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_updates)
        for step in range(T):
            with torch.no_grad():
                logits, _ = agent(obs)
                action = torch.distributions.Categorical(logits=logits).sample()
            rollout["obs"][step], rollout["actions"][step] = obs, action
            next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            global_step += N
            rollout["rewards"][step] = torch.as_tensor(np.sign(reward), dtype=torch.float32, device=device)
            rollout["dones"][step] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
            rollout["ends"][step] = torch.as_tensor(terminated | truncated, dtype=torch.float32, device=device)
            rollout["final_values"][step] = 0.0
            if truncated.any():  # bootstrap a truncation from V of its true last observation
                with torch.no_grad():
                    final = torch.as_tensor(info["final_obs"][truncated], device=device)
                    rollout["final_values"][step, torch.as_tensor(truncated, device=device)] = agent(final)[1]
            game_returns += reward
            game_lengths += 1
            # a life loss (fewer lives, the game goes on) ends a training episode, not the logged game;
            # at a game's end the same-step reset shows the new game's lives, no fewer than before
            life_lost = terminated & (info["lives"] < lives) & args.episodic_life
            lives = info["lives"]
            for i in np.flatnonzero(terminated | truncated):
                if truncated[i] or not life_lost[i]:
                    writer.add_scalar("charts/episodic_return", game_returns[i], global_step)
                    writer.add_scalar("charts/episodic_length", game_lengths[i], global_step)
                    game_returns[i], game_lengths[i] = 0.0, 0
            obs = torch.as_tensor(next_obs, device=device)
        rollout["next_obs"] = obs

        stats = update(agent, optimizer, rollout, args)
        if iteration % args.log_frequency == 0 or iteration == 1:
            loss = stats["loss"].item()
            if not np.isfinite(loss):
                raise SystemExit(
                    f"error: the loss is {loss} at step {global_step}: training diverged; try a smaller --learning-rate"
                )
            for key, value in stats.items():
                writer.add_scalar(f"losses/{key}", float(value), global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)

        if global_step >= next_eval or iteration == num_updates:
            next_eval += args.eval_frequency
            video = f"videos/{run_name}" if args.capture_video else None  # one file per evaluation
            returns = evaluate_policy(
                agent,
                game,
                args.eval_episodes,
                args.seed + 10_000,
                device,
                args.sticky_actions,
                args.max_episode_frames,
                video,
                f"eval-step-{global_step}",
            )
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            print(
                f"step {global_step}/{args.total_timesteps}: eval return {returns.mean():.1f} +- {returns.std():.1f}, "
                f"SPS {sps}",
                flush=True,
            )

    if args.checkpoint_frequency:  # the end too, so that a finished run can be extended with --resume
        write_checkpoint(num_updates)
        print(f"checkpoint written to {checkpoint_path}")
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save({"args": vars(args), "n_actions": int(n_actions), "agent": agent.state_dict()}, model_path)
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, None, args.eval_episodes, args.seed + 20_000, str(device))
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
        print(f"reloaded model: eval return {returns.mean():.1f} +- {returns.std():.1f}")

    envs.close()
    writer.close()
