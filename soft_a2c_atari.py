"""Entropy-regularised A2C (naive or proper) and its soft Q-learning twin, on Atari.

Schulman, Chen, Abbeel, "Equivalence Between Policy Gradients and Soft Q-Learning", 2017, Secs.
6.1 and 6.3. Docs: docs/soft_a2c.md. One network (Nature CNN, policy and value heads), 16 envs x
5-step rollouts, a penalty p(s) = KL(pi || uniform) (kl) or -H(pi) (entropy), temperature tau:
  pg naive    R_t = sum_k gamma^k r_{t+k} + gamma^{T-t} V(s_T)                          (Eq. 79)
              loss -ln pi(a_t|s_t) (R_t - V(s_t)) + tau p(s_t) + c/2 (V(s_t) - R_t)^2
  pg proper   the same with r_{t+k} - tau p(s_{t+k}) inside R_t, detached              (Eq. 80)
  soft-q      1/2 (Q(s_t, a_t) - y_t)^2, Q = V + tau ln(pi / pi_bar) (kl, Eq. 57; entropy: no
              pi_bar), y_t = r_t + sum_{k>0} gamma^k (r_{t+k} - tau p(s_{t+k})) + gamma^{T-t} V(s_T)
By Eq. 65 soft-q's expected gradient is tau grad L_policy + grad L_value; scaling the gradient into
tau ln pi by 1/tau and into V by c gives A2C proper's (the paper prints "1/epsilon", a typo). A2C
settings (Sec. 6.1): RMSprop 7e-4 decaying to 0, tau 0.01, c 0.5, gradient clip 0.5; rewards
clipped to their sign for training. Atari: ale-py's vector env with DeepMind's preprocessing; a
life lost ends a training episode; truncations bootstrap from V of the true last observation.

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
from importlib.util import find_spec
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    env_id: str = "BreakoutNoFrameskip-v4"
    """the Atari game: BreakoutNoFrameskip-v4, ALE/Breakout-v5 or breakout all mean Breakout"""
    total_timesteps: int = 10000000
    """total timesteps of the experiments (agent steps over all envs; 4 frames each)"""
    learning_rate: float = 7e-4  # the learning rate of the RMSprop optimizer
    anneal_lr: bool = True  # toggle linear decay of the learning rate to 0
    num_envs: int = 16  # the number of parallel game environments
    num_steps: int = 5  # the number of steps of each rollout per environment
    gamma: float = 0.99  # the discount factor gamma
    tau: float = 0.01  # the regularisation temperature tau (the role of CleanRL's --ent-coef)
    objective: Literal["naive", "proper"] = "proper"
    """`naive` (Eq. 79: a penalty at s_t only) or `proper` (Eq. 80: penalties inside the return)"""
    regularizer: Literal["kl", "entropy"] = "kl"  # KL to the uniform policy, or entropy bonus
    update: Literal["pg", "soft-q"] = "pg"  # A2C, or Sec. 6.3's soft Q with Q = V + tau ln pi
    vf_coef: float = 0.5  # value coefficient c of A2C
    adv_grad_scale: float | None = None
    """soft-q: scale of the gradient into the advantage stream tau ln pi (default 1/tau)"""
    value_grad_scale: float = 0.5  # soft-q: the value stream's gradient scale (c, as A2C)
    max_grad_norm: float = 0.5  # the maximum norm for the gradient clipping
    rms_alpha: float = 0.99  # RMSprop decay
    rms_eps: float = 1e-5  # RMSprop epsilon
    sticky_actions: bool = False  # repeat the previous action with probability 0.25 (ALE v5)
    episodic_life: bool = True
    """a life lost ends the training episode (not the logged game), as OpenAI's A2C and CleanRL"""
    max_episode_frames: int = 108000  # truncate episodes here (truncations still bootstrap)

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be enabled when available
    eval_frequency: int = 500000  # run evaluation episodes every this many steps
    eval_episodes: int = 10  # the number of evaluation episodes (actions sampled from pi)
    log_frequency: int = 100  # log losses every this many updates
    save_model: bool = False  # save the model into runs/{run_name}, then reload and evaluate it
    checkpoint_frequency: int = 0
    """checkpoint at the first update after every this many steps; 0: only on SIGTERM or Ctrl-C. A
    resumed run starts new games (ale-py's vector env cannot save its emulators)"""
    resume: str | None = None
    """continue the run of this checkpoint (or run folder); only
    --total-timesteps, --checkpoint-frequency, --stop-at, --cuda and --track may change"""
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
    """ale-py's C++ vector env with DeepMind's preprocessing; unclipped rewards; same-step autoreset
    (the returned observation is the reset one, the true last one is in info["final_obs"]).
    rgb=True: the same env showing the game's 210x160 colour screen (videos; fed the same actions
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
        # A2C's init (OpenAI baselines, CleanRL): orthogonal, gain sqrt(2) for ReLU layers, 0.01 for
        # the policy (pi starts uniform), 1 for the value, zero biases; PyTorch's default left most
        # hidden units dead and V flat on Breakout (docs/soft_a2c.md)
        for layer in [*self.torso, self.policy, self.value]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                gain = 0.01 if layer is self.policy else 1.0 if layer is self.value else np.sqrt(2)
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor):
        h = self.torso(x.to(self.value.weight.dtype) / 255.0)
        return self.policy(h), self.value(h).squeeze(-1)


def penalty(logits: torch.Tensor, regularizer: str) -> torch.Tensor:
    """p(s) of Eqs. 79/80: KL(pi || uniform) = ln|A| - H(pi) (kl, Eq. 29's prior) or -H(pi)
    (entropy); tau p(s) is the loss term, -tau p(s) the reward shaping of the proper return."""
    log_pi = torch.log_softmax(logits, -1)
    neg_entropy = (log_pi.exp() * log_pi).sum(-1)
    return neg_entropy + np.log(logits.shape[-1]) if regularizer == "kl" else neg_entropy


def nstep_returns(rewards, penalties, dones, ends, next_values, final_values, gamma, tau, kind):
    """(T, N) returns of a rollout. rewards[t], penalties[t] = p(s_t) (detached), dones[t] /
    ends[t]: s_{t+1} is terminal / ends the episode; next_values: V(s_T) (N,); final_values[t]: V
    of the true last observation where a truncation ended the episode at s_{t+1}.
      kind "naive":  R_t = sum_k gamma^k r_{t+k} + gamma^{T-t} V(s_T)                  (Eq. 79)
      kind "proper": r~_{t+k} = r_{t+k} - tau p(s_{t+k}) for every k >= 0               (Eq. 80)
      kind "soft-q": the proper return plus tau p(s_t): the penalty at s_t cancels       (Eq. 47)"""
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


def a2c_loss(logits, values, actions, returns, tau, vf_coef, regularizer: str, weights=None):
    """A2C's loss (Eqs. 79/80; the returns decide which): -ln pi(a|s) (R - V) + tau p(s) +
    c/2 (V - R)^2. `weights` (per sample) make the mean a weighted average (the tests use pi)."""
    log_pi_a = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantages = (returns - values).detach()
    policy_terms = -log_pi_a * advantages + tau * penalty(logits, regularizer)
    policy_loss = weighted_mean(policy_terms, weights)
    value_loss = weighted_mean(0.5 * (values - returns).pow(2), weights)
    stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach()}
    return policy_loss + vf_coef * value_loss, stats


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass, scale * grad in the backward pass."""
    return x * scale + x.detach() * (1.0 - scale)


def soft_q_loss(logits, values, actions, targets, tau: float, regularizer: str, adv_grad_scale=1.0,
                value_grad_scale=1.0, weights=None):  # fmt: skip
    """Section 6.3: 1/2 (Q(s, a) - y)^2 with Q = V + tau ln(pi(a|s)/pi_bar(a)) (kl) or V + tau ln pi
    (entropy); the gradients into the advantage and value streams are scaled (1/tau, c: A2C's)."""
    log_pi_a = torch.log_softmax(logits, -1).gather(1, actions.unsqueeze(1)).squeeze(1)
    advantage = tau * (log_pi_a + (np.log(logits.shape[-1]) if regularizer == "kl" else 0.0))
    q = scale_grad(values, value_grad_scale) + scale_grad(advantage, adv_grad_scale)
    loss = weighted_mean(0.5 * (q - targets).pow(2), weights)
    return loss, {"soft_q_loss": loss.detach()}


def update(rollout: dict, next_obs: torch.Tensor, learner: dict, args: Args) -> dict:
    """One gradient step on a rollout: the n-step returns (Eq. 79, 80 or 47, detached), then the
    loss of --update (clipped gradient norm, RMSprop). Returns the loss and estimates to log."""
    agent, T, N = learner["agent"], args.num_steps, args.num_envs
    logits, values = agent(rollout["obs"].flatten(0, 1))
    with torch.no_grad():
        penalties = penalty(logits.detach(), args.regularizer).view(T, N)
        kind = "soft-q" if args.update == "soft-q" else args.objective
        returns = nstep_returns(rollout["rewards"], penalties, rollout["dones"], rollout["ends"],
                                agent(next_obs)[1], rollout["final_values"], args.gamma, args.tau,
                                kind).flatten()  # fmt: skip
    actions = rollout["actions"].flatten()
    if args.update == "soft-q":
        adv_scale = 1.0 / args.tau if args.adv_grad_scale is None else args.adv_grad_scale
        loss, stats = soft_q_loss(logits, values, actions, returns, args.tau, args.regularizer,
                                  adv_scale, args.value_grad_scale)
    else:
        loss, stats = a2c_loss(logits, values, actions, returns, args.tau, args.vf_coef,
                               args.regularizer)
    learner["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    learner["optimizer"].step()
    return dict(loss=loss.detach(), stats=stats, logits=logits.detach(), values=values.detach(),
                returns=returns)


def train(args: Args) -> None:
    args, run, envs = start_run(args)  # --eval-model; resume, checks, envs, writer, seeds...
    device, T, N = run.device, args.num_steps, args.num_envs
    n_actions = envs.single_action_space.n
    agent = Agent(n_actions).to(device)
    rms = dict(lr=args.learning_rate, alpha=args.rms_alpha, eps=args.rms_eps)
    optimizer = torch.optim.RMSprop(agent.parameters(), **rms)
    rollout = {
        "obs": torch.zeros((T, N, 4, 84, 84), dtype=torch.uint8, device=device),
        "actions": torch.zeros((T, N), dtype=torch.long, device=device),
        **{k: torch.zeros((T, N), device=device)
           for k in ("rewards", "dones", "ends", "final_values")},
    }
    num_updates = args.total_timesteps // (T * N)
    learner = dict(agent=agent, optimizer=optimizer)
    global_step, start_iteration = run.restore(learner)  # a checkpoint's learner and counters
    obs, reset_info = envs.reset(seed=args.seed + global_step)
    obs = torch.as_tensor(obs, device=device)
    lives = reset_info["lives"]
    game_returns, game_lengths = np.zeros(N), np.zeros(N, dtype=np.int64)
    for iteration in range(start_iteration, num_updates + 1):
        # SIGTERM, Ctrl-C or --stop-at: checkpoint, exit; and every --checkpoint-frequency steps
        run.save_if_due(global_step, iteration - 1, learner, n_actions)
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / num_updates
            optimizer.param_groups[0]["lr"] = args.learning_rate * frac
        for step in range(T):
            with torch.no_grad():
                logits, _ = agent(obs)
                action = torch.distributions.Categorical(logits=logits).sample()
            rollout["obs"][step], rollout["actions"][step] = obs, action
            next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            global_step += N
            rollout["rewards"][step] = torch.as_tensor(np.sign(reward), device=device)  # clipped
            rollout["dones"][step] = torch.as_tensor(terminated, device=device)
            rollout["ends"][step] = torch.as_tensor(terminated | truncated, device=device)
            rollout["final_values"][step] = 0.0
            if truncated.any():  # bootstrap a truncation from V of its true last observation
                with torch.no_grad():
                    final = torch.as_tensor(info["final_obs"][truncated], device=device)
                    cut = torch.as_tensor(truncated, device=device)
                    rollout["final_values"][step, cut] = agent(final)[1]
            game_returns += reward
            game_lengths += 1
            # a life loss (fewer lives, the game goes on) ends a training episode, not the logged
            # game; at a game's end the same-step reset shows the new game's lives, no fewer
            life_lost = terminated & (info["lives"] < lives) & args.episodic_life
            lives = info["lives"]
            for i in np.flatnonzero(terminated | truncated):
                if truncated[i] or not life_lost[i]:
                    run.log_game(game_returns[i], game_lengths[i], global_step)
                    game_returns[i], game_lengths[i] = 0.0, 0
            obs = torch.as_tensor(next_obs, device=device)

        logs = update(rollout, obs, learner, args)
        if iteration % args.log_frequency == 0 or iteration == 1:  # stops a diverging run
            log_update(run, logs, learner, args, n_actions, global_step)
        if run.evaluation_due(global_step, iteration == num_updates):
            run.evaluate(global_step, agent)
        run.progress.update(global_step, run.last_return)
    run.finish(global_step, num_updates, learner, n_actions)


# ---------------------------------------------------------------------------------------------
# Appendix: input checks, evaluation, logging and checkpoints
# ---------------------------------------------------------------------------------------------
def check_args(args: Args, checkpoint: dict | None = None) -> None:
    """Stop with a one-line error naming the fix, before anything is built."""
    step = checkpoint["global_step"] if checkpoint else 0
    rollout = args.num_envs * args.num_steps
    for ok, msg in [
        (0 < args.gamma < 1, f"--gamma must be in (0, 1) (got {args.gamma}); 0.99 is usual"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1 (got {args.eval_episodes})"),
        (args.seed >= 0, f"--seed must be >= 0 (got {args.seed}): NumPy takes seeds in [0, 2**32)"),
        (args.learning_rate > 0, "--learning-rate must be > 0"),
        (not args.track or find_spec("wandb"), "--track needs wandb: pip install wandb"),
        (args.tau > 0, f"--tau must be > 0 (got {args.tau}); the paper uses 0.01"),
        (args.num_envs >= 1, f"--num-envs must be at least 1 (got {args.num_envs}); the paper: 16"),
        (args.num_steps >= 1, f"--num-steps must be at least 1 (got {args.num_steps}); A2C uses 5"),
        (args.total_timesteps >= rollout,
         f"--total-timesteps {args.total_timesteps} < one rollout of --num-envs x --num-steps = "
         f"{rollout} agent steps: no update would run; raise --total-timesteps"),
        (step + rollout <= args.total_timesteps,
         f"the run in {args.resume} is complete ({step} steps); extend it with --total-timesteps"),
        (args.eval_frequency >= 1, f"--eval-frequency must be >= 1 (got {args.eval_frequency})"),
        (args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0; 0 turns it off"),
    ]:  # fmt: skip
        if not ok:
            sys.exit(f"error: {msg}")
    if args.capture_video:
        check_video_prerequisites()


def start_run(args: Args):
    """The run's set-up before any network: --eval-model evaluates and exits here; else the flags
    of a checkpoint with --resume, the checks, the envs and a Run (name, writer, seeds...)."""
    if args.eval_model:  # evaluate a saved model or checkpoint, and exit
        video = "videos/eval" if args.capture_video else None
        r = evaluate(args.eval_model, args.eval_episodes, args.seed, "cpu", video_folder=video)
        print(f"{args.eval_model}: eval return {r.mean():.1f} +- {r.std():.1f}")
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume, "--resume") if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args
    check_args(args, checkpoint)
    game, start_step = atari_game(args.env_id), checkpoint["global_step"] if checkpoint else 0
    # a resumed run starts new games, seeded by the step it resumes at
    life, frames = args.episodic_life, args.max_episode_frames
    envs = make_env(game, args.num_envs, args.seed + start_step, args.sticky_actions, life, frames)
    run = Run(args, checkpoint, game, envs)
    # printed by Run.restore, just before the loop
    run.banner = (
        f"{SCRIPT}: {game}, {envs.single_action_space.n} actions, {args.num_envs} envs x "
        f"{args.num_steps} steps, update {args.update}, objective {args.objective}, regularizer "
        f"{args.regularizer}, tau {args.tau}; {run.device}; runs/{run.name}"
    )
    return args, run, envs


def log_update(run: "Run", logs: dict, learner: dict, args: Args, n_actions: int, step: int):
    """Stop a run whose loss is not finite or whose values run away; log the update's loss,
    its terms, the policy's entropy and how much of the returns' variance V explains."""
    if not torch.isfinite(logs["loss"]):
        sys.exit(f"error: a non-finite loss at step {step}: lower --learning-rate")
    # rewards are clipped to their sign, so |r| <= 1; |tau p(s)| <= tau ln|A|
    values, returns = logs["values"], logs["returns"]
    check_values(values, 1.0, args.gamma, args.tau * np.log(n_actions), step)
    log_pi = torch.log_softmax(logs["logits"], -1)
    entropy = -(log_pi.exp() * log_pi).sum(-1).mean()
    var_r = returns.var()
    explained = 1 - (returns - values).var() / var_r if var_r > 0 else torch.tensor(0.0)
    stats = logs["stats"]
    stats.update(loss=logs["loss"], entropy=entropy, kl_to_uniform=np.log(n_actions) - entropy)
    stats.update(explained_variance=explained, values=values.mean())
    lr = learner["optimizer"].param_groups[0]["lr"]
    run.writer.add_scalar("charts/learning_rate", lr, step)
    run.log(stats, step)


def check_values(values, max_reward: float, gamma: float, bonus: float, step: int) -> None:
    """Stop a run whose values run away with a finite loss: mean |V| over ten times
    (max |r| + bonus)/(1 - gamma), the largest discounted return; bonus: the largest |tau p(s)|."""
    bound = (float(max_reward) + bonus) / max(1.0 - gamma, 1e-8)
    if 0 < 10 * bound < (mean := values.abs().mean().item()):
        sys.exit(f"error: the values diverged at step {step} (mean |V| {mean:.4g} > 10 x "
                 f"{bound:.4g}); try a smaller --learning-rate")


def check_video_prerequisites() -> None:
    """Videos are written with moviepy: say so at start, not at the first evaluation."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        sys.exit("error: --capture-video needs moviepy: pip install moviepy")


def evaluate_policy(agent: Agent, game: str, n_episodes: int, seed: int, device, sticky=False,
                    max_frames=108000, video_folder=None, video_name="eval"):  # fmt: skip
    """Game returns (unclipped, whole games) of episodes acting with actions sampled from pi (a
    greedy Breakout agent that never presses FIRE would never end). With a video folder, the first
    game is saved as `video_name`-episode-0.mp4 in colour: a twin env with the same seed, fed the
    same actions, shows the screen the network sees in 84x84 grey."""
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


def evaluate(path: str, eval_episodes=10, seed=0, device="cpu", max_frames=None, video_folder=None):
    """Evaluation game returns of a saved model or checkpoint; the game and the episode cap come
    from the file, `max_frames` overrides the cap."""
    saved = load_checkpoint(path, "--eval-model")
    if video_folder:
        check_video_prerequisites()
    game, args = atari_game(saved["args"]["env_id"]), saved["args"]
    max_frames = args["max_episode_frames"] if max_frames is None else max_frames
    agent = Agent(saved["n_actions"]).to(device)
    agent.load_state_dict(saved["agent"])
    device, sticky = torch.device(device), args["sticky_actions"]
    return evaluate_policy(agent, game, eval_episodes, seed, device, sticky, max_frames,
                           video_folder)


class Run:
    """The run-keeping half of train(): the run's name, stop signals, writer and seeds, then its
    checkpoints, logs of games and updates, evaluations, the progress line and the saved model."""

    def __init__(self, args: Args, checkpoint: dict | None, game: str, envs):
        name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.args, self.checkpoint, self.game, self.envs = args, checkpoint, game, envs
        self.name = checkpoint["run_name"] if checkpoint else name
        self.path = f"runs/{self.name}/checkpoint.pt"
        self.signals = []  # SIGTERM (a job's time limit) or Ctrl-C: checkpoint after the update
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda sig, frame: self.signals.append(sig))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                       sync_tensorboard=True, name=self.name, save_code=True)  # fmt: skip
        # a checkpoint is taken after the update that logged at its step: hide the logs after it
        purge_step = checkpoint["global_step"] + 1 if checkpoint else None
        self.writer = SummaryWriter(f"runs/{self.name}", purge_step=purge_step)
        if not checkpoint:
            table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.start_step, self.last_return, self.next_eval = 0, None, args.eval_frequency

    def restore(self, learner: dict) -> tuple[int, int]:
        """Load a checkpoint's learner, counters and random states; the step and the iteration to
        go on from."""
        print(self.banner)
        start_iteration = 1
        if ckpt := self.checkpoint:
            for key, x in learner.items():  # networks and optimizer
                x.load_state_dict(ckpt[key])
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.start_step, self.next_eval = ckpt["global_step"], ckpt["next_eval"]
            start_iteration = ckpt["iteration"] + 1
            total = self.args.total_timesteps
            print(f"resumed {self.args.resume} at step {self.start_step} of {total}, new games")
        every = self.args.checkpoint_frequency  # the first checkpoint: at the update after it
        self.next_checkpoint = (self.start_step // every + 1) * every if every else 0
        self.progress = Progress(self.args.total_timesteps, self.start_step)
        self.start_time = time.time()
        return self.start_step, start_iteration

    def save(self, step: int, iterations_done: int, learner: dict, n_actions: int) -> None:
        """The learner after the update that reached step `step`, the counters and the random
        states (not the games in progress); written to a temporary file, then renamed: a kill
        mid-write leaves the last checkpoint whole."""
        rng = dict(python=random.getstate(), numpy=np.random.get_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        rng.update(torch=torch.get_rng_state(), cuda=cuda)
        counters = dict(iteration=iterations_done, next_eval=self.next_eval)
        counters["n_actions"] = int(n_actions)
        state = {k: x.state_dict() for k, x in learner.items()}
        meta = dict(script=SCRIPT, args=vars(self.args), run_name=self.name, global_step=step)
        torch.save({**meta, "rng": rng, **counters, **state}, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def save_if_due(self, step: int, iterations_done: int, learner: dict, n_actions: int) -> None:
        """Before an update: on SIGTERM, Ctrl-C or --stop-at, checkpoint and exit; else checkpoint
        when --checkpoint-frequency steps have passed."""
        if self.signals or (self.args.stop_at is not None and step >= self.args.stop_at):
            self.save(step, iterations_done, learner, n_actions)
            why = f"signal {self.signals[0]}" if self.signals else "--stop-at"
            self.progress.print(f"stopped by {why} at step {step}; --resume {self.path}")
            sys.exit(128 + self.signals[0] if self.signals else 0)
        if (every := self.args.checkpoint_frequency) and step >= self.next_checkpoint:
            self.next_checkpoint = (step // every + 1) * every
            self.save(step, iterations_done, learner, n_actions)

    def log_game(self, game_return: float, game_length: int, step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", game_return, step)
        self.last_return = game_return
        self.writer.add_scalar("charts/episodic_length", game_length, step)

    def log(self, scalars: dict, step: int) -> None:  # an update's loss and estimates, and SPS
        for tag, value in scalars.items():
            self.writer.add_scalar(f"losses/{tag}", value, step)
        self.writer.add_scalar("charts/SPS", self.sps(step), step)

    def sps(self, steps: int) -> int:
        return int((steps - self.start_step) / (time.time() - self.start_time))

    def evaluation_due(self, step: int, last: bool) -> bool:
        if step >= self.next_eval or last:
            self.next_eval += self.args.eval_frequency
            return True
        return False

    def evaluate(self, step: int, agent) -> None:
        """Evaluate the policy, sampled, on new games; log the mean game return."""
        args = self.args
        video = f"videos/{self.name}" if args.capture_video else None  # one file per evaluation
        returns = evaluate_policy(agent, self.game, args.eval_episodes, args.seed + 10_000,
                                  self.device, args.sticky_actions, args.max_episode_frames, video,
                                  f"eval-step-{step}")  # fmt: skip
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.progress.print(f"step {step}: eval return {returns.mean():.1f} "
                            f"+- {returns.std():.1f}, SPS {self.sps(step)}")

    def finish(self, step: int, num_updates: int, learner: dict, n_actions: int) -> None:
        """End the progress line; a last checkpoint with --checkpoint-frequency (a finished run can
        be extended with --resume); with --save-model, save the agent, reload and evaluate it."""
        self.progress.print()
        if self.args.checkpoint_frequency:
            self.save(step, num_updates, learner, n_actions)
        if (args := self.args).save_model:
            path = f"runs/{self.name}/{args.exp_name}.cleanrl_model"
            saved = {"n_actions": int(n_actions), "agent": learner["agent"].state_dict()}
            torch.save({"script": SCRIPT, "args": vars(args), **saved}, path)
            returns = evaluate(path, args.eval_episodes, args.seed + 20_000, str(self.device))
            for idx, episodic_return in enumerate(returns):
                self.writer.add_scalar("eval/reloaded_episodic_return", episodic_return, idx)
            print(f"model saved to {path}; reloaded: eval return {returns.mean():.1f}")
        self.envs.close()
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
