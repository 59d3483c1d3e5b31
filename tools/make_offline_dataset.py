"""Make an offline RL dataset from rollouts of a policy, without internet: a D4RL-format HDF5 file
and/or a local Minari dataset, ready for `xql_offline.py --dataset ...`.

    # 20 episodes of a built-in Pendulum swing-up controller with Gaussian action noise 0.2
    python tools/make_offline_dataset.py --env-id Pendulum-v1 --policy pendulum-expert --noise 0.2 \\
        --episodes 20 --out pendulum-expert.hdf5
    # uniform random actions, also written as the local Minari dataset pendulum/random-v0
    python tools/make_offline_dataset.py --env-id Pendulum-v1 --policy random --episodes 20 \\
        --out pendulum-random.hdf5 --minari-id pendulum/random-v0
    # your own policy: any importable function obs -> action
    python tools/make_offline_dataset.py --env-id Hopper-v5 --policy mypackage.policies:act --steps 100000 \\
        --out hopper-mine.hdf5
    # a policy trained by xql_sac.py, xql_td3.py, iq_continuous.py or miq_continuous.py (the mean or
    # mode action), from a checkpoint or saved model
    python tools/make_offline_dataset.py --env-id Hopper-v5 --policy checkpoint:runs/RUN/checkpoint.pt --steps 100000 \
        --noise 0.1 --out hopper-medium.hdf5
    # the replay buffer of such a run, as D4RL's medium-replay is: every transition the agent saw while learning
    python tools/make_offline_dataset.py --from-replay runs/RUN/checkpoint.pt --out hopper-replay.hdf5
    # several files into one (e.g. expert + random = a "medium-expert"-like mix)
    python tools/make_offline_dataset.py --merge pendulum-expert.hdf5 pendulum-random.hdf5 --out pendulum-mix.hdf5

The HDF5 file has D4RL's keys: observations, actions, rewards, terminals, timeouts (a time-limit
truncation, as D4RL records it), and next_observations (the true next observation, also at a
truncation). Its attributes record env_id and, if given, ref_min_score / ref_max_score (the
returns that `xql_offline.py` maps to normalised scores 0 and 100). The Minari dataset is written
to Minari's local folder (~/.minari/datasets or $MINARI_DATASETS_PATH) with the same reference
scores. Writing Minari needs `pip install "minari[hdf5]"` (not jax: no DataCollector is used).
"""

import argparse
import importlib
import os
import sys

import gymnasium as gym
import numpy as np

KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """A hand-written Pendulum-v1 swing-up controller (about -140 per episode; random: about -1200).

    Pendulum's dynamics are theta'' = 15 sin(theta) + 3u (theta = 0 upright). Far from the top it
    pumps energy E = theta'^2/2 + 15 (cos(theta) - 1), whose rate is dE/dt = 3u theta', towards the
    upright energy 0; near the top a PD law holds it."""
    cos_th, sin_th, w = obs
    if cos_th > 0.9:
        u = -(10.0 * np.arctan2(sin_th, cos_th) + 2.0 * w)
    else:
        energy = 0.5 * w * w + 15.0 * (cos_th - 1.0)
        u = 2.0 * np.sign(-w * energy) if abs(w) > 1e-3 else 1.0
    return np.clip(np.array([u], dtype=np.float32), -2.0, 2.0)


def load_run(path: str) -> tuple:
    """A checkpoint or --save-model file of xql_sac.py, xql_td3.py, iq_continuous.py or miq_continuous.py:
    (its contents, the script's module)."""
    import torch

    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file (checkpoints are runs/<run>/checkpoint.pt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted
    script = checkpoint.get("script", "")[: -len(".py")] if isinstance(checkpoint, dict) else None
    if script not in ("xql_sac", "xql_td3", "iq_continuous", "miq_continuous"):
        raise SystemExit(
            f"error: {path} is not a checkpoint or saved model of xql_sac.py, xql_td3.py, iq_continuous.py "
            "or miq_continuous.py"
        )
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return checkpoint, importlib.import_module(script)


def checkpoint_policy(path: str, env: gym.Env, sample: bool = False):
    """The actor of a run of xql_sac.py (its mean action, or with `sample` a draw from the policy),
    xql_td3.py, or iq_continuous.py / miq_continuous.py (the policy's mode), as a function obs -> action."""
    import torch

    checkpoint, module = load_run(path)
    if sample and checkpoint["script"] != "xql_sac.py":
        raise SystemExit(f"error: {path}: --sample draws from a run of xql_sac.py only")
    obs_dim = env.observation_space.shape[0]
    if "n_bins" in checkpoint["args"]:
        saved = checkpoint["args"]
        policy = module.make_policy(
            saved["policy"], obs_dim, env.action_space.low, env.action_space.high, saved["n_bins"]
        )
        policy.load_state_dict(checkpoint["policy"])

        @torch.no_grad()
        def act_mode(obs):
            x = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
            return policy.to_env(policy.mode(x))[0].numpy()

        return act_mode
    actor = module.Actor(obs_dim, env.action_space.low, env.action_space.high, checkpoint["args"]["hidden_size"])
    actor.load_state_dict(checkpoint["actor"])

    @torch.no_grad()
    def act(obs):
        x = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        if hasattr(actor, "get_action"):  # (sample, log-probability, mean)
            return actor.get_action(x)[0 if sample else 2][0].numpy()
        return actor(x)[0].numpy()

    return act


def replay_episodes(path: str, first: int | None = None) -> tuple[list, str]:
    """The replay buffer of a checkpoint of xql_sac.py or xql_td3.py, in the order it was filled (only
    its `first` transitions if given), cut into episodes: one ends where it terminated, or where the
    next stored transition does not start from its next observation (a time limit; the true last
    observation is kept). Returns (episodes, env id)."""
    checkpoint, _ = load_run(path)
    rb = checkpoint.get("rb")
    if rb is None:
        raise SystemExit(f"error: {path} holds no replay buffer (a --save-model file): use its checkpoint.pt")
    size, pos, capacity = rb["size"], rb["pos"], rb["capacity"]
    order = np.r_[pos:size, 0:pos] if size == capacity else np.arange(size)  # oldest first
    if first is not None:
        if size == capacity and pos > 0:
            raise SystemExit(f"error: {path}: the buffer has wrapped round; its first transitions are gone")
        order = order[:first]
    obs, next_obs = rb["obs"].numpy()[order], rb["next_obs"].numpy()[order]
    actions, rewards, dones = rb["actions"].numpy()[order], rb["rewards"].numpy()[order], rb["dones"].numpy()[order]
    ends = dones.astype(bool).copy()
    ends[:-1] |= np.any(next_obs[:-1] != obs[1:], axis=1)
    ends[-1] = True
    episodes, start = [], 0
    for end in np.flatnonzero(ends):
        sl = slice(start, end + 1)
        episodes.append(
            {
                "observations": np.concatenate([obs[sl], next_obs[end : end + 1]]),
                "actions": actions[sl],
                "rewards": rewards[sl],
                "terminations": dones[sl].astype(bool),
                "truncations": ends[sl] & ~dones[sl].astype(bool),
            }
        )
        start = end + 1
    return episodes, checkpoint["args"]["env_id"]


def resolve_policy(spec: str, env: gym.Env, sample: bool = False):
    """'random', 'pendulum-expert', 'checkpoint:PATH' (a run of xql_sac.py, xql_td3.py, iq_continuous.py
    or miq_continuous.py), or
    'module:function' (a function obs -> action)."""
    if spec == "random":
        return lambda obs: env.action_space.sample()
    if spec == "pendulum-expert":
        return pendulum_expert
    if spec.startswith("checkpoint:"):
        return checkpoint_policy(spec.split(":", 1)[1], env, sample)
    if ":" not in spec:
        raise SystemExit(
            f"error: --policy {spec!r}: use 'random', 'pendulum-expert', 'checkpoint:PATH' or 'module:function'"
        )
    module, name = spec.split(":", 1)
    return getattr(importlib.import_module(module), name)


def rollout(
    env_id: str,
    policy,
    episodes: int | None = None,
    steps: int | None = None,
    noise: float = 0.0,
    epsilon: float = 0.0,
    seed: int = 0,
    max_episode_steps: int | None = None,
    sample: bool = False,
) -> list:
    """Run `policy` (obs -> action) for a number of episodes or steps. Each action gets Gaussian noise
    of std `noise` (in units of the action half-range) and, with probability `epsilon`, is replaced
    by a uniform random one; `sample` draws a checkpoint's SAC actions from its policy. Returns episodes as dicts: observations (T+1), actions, rewards,
    terminations, truncations (T); a step budget ends the last episode as a truncation."""
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    if isinstance(policy, str):
        policy = resolve_policy(policy, env, sample)
    env.action_space.seed(seed)
    if sample:
        import torch

        torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    out, total = [], 0
    while (episodes is not None and len(out) < episodes) or (steps is not None and total < steps):
        obs, _ = env.reset(seed=seed + len(out))
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        while True:
            action = np.asarray(policy(obs), dtype=np.float32)
            action = action + noise * (high - low) / 2 * rng.standard_normal(action.shape)
            if rng.random() < epsilon:
                action = env.action_space.sample()
            action = np.clip(action, low, high).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += 1
            truncated = truncated or (steps is not None and total >= steps and not terminated)
            for key, value in zip(
                ["observations", "actions", "rewards", "terminations", "truncations"],
                [obs, action, reward, terminated, truncated],
            ):
                ep[key].append(value)
            if terminated or truncated:
                break
        out.append({k: np.array(v) for k, v in ep.items()})
    return out


def episodes_to_d4rl(episodes: list) -> dict:
    """Concatenate episodes into D4RL's flat arrays (timeouts = truncations, plus next_observations)."""
    cat = np.concatenate
    return {
        "observations": cat([e["observations"][:-1] for e in episodes]).astype(np.float32),
        "actions": cat([e["actions"] for e in episodes]).astype(np.float32),
        "rewards": cat([e["rewards"] for e in episodes]).astype(np.float32),
        "terminals": cat([e["terminations"] for e in episodes]).astype(bool),
        "timeouts": cat([e["truncations"] for e in episodes]).astype(bool),
        "next_observations": cat([e["observations"][1:] for e in episodes]).astype(np.float32),
    }


def write_hdf5(
    path: str, data: dict, env_id: str, ref_min_score: float | None = None, ref_max_score: float | None = None
) -> None:
    import h5py

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # e.g. data/, which git ignores
    with h5py.File(path, "w") as f:
        for key in KEYS:
            if key in data:
                f.create_dataset(key, data=data[key], compression="gzip")
        f.attrs["env_id"] = env_id
        if ref_min_score is not None and ref_max_score is not None:
            f.attrs["ref_min_score"], f.attrs["ref_max_score"] = float(ref_min_score), float(ref_max_score)


def read_hdf5(path: str) -> tuple:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in KEYS if k in f}, dict(f.attrs)


def write_minari(
    dataset_id: str, episodes: list, env_id: str, ref_min_score: float | None = None, ref_max_score: float | None = None
):
    """Write `episodes` as a local Minari dataset (replacing one of the same id)."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=e["observations"].astype(np.float32),
            actions=e["actions"].astype(np.float32),
            rewards=list(e["rewards"]),
            terminations=list(e["terminations"]),
            truncations=list(e["truncations"]),
            infos={},
        )
        for i, e in enumerate(episodes)
    ]
    scores = {}
    if ref_min_score is not None and ref_max_score is not None:
        scores = {"ref_min_score": float(ref_min_score), "ref_max_score": float(ref_max_score)}
    return minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=gym.make(env_id),
        eval_env=env_id,
        algorithm_name="tools/make_offline_dataset.py",
        author="tools/make_offline_dataset.py",
        author_email="-",
        code_permalink="-",
        description=f"{len(episodes)} episodes of {env_id} rolled out by tools/make_offline_dataset.py",
        **scores,
    )


def d4rl_to_episodes(data: dict) -> list:
    """Split D4RL flat arrays (with next_observations) back into episodes, at terminals and timeouts."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    if len(ends) == 0 or ends[-1] != len(data["rewards"]) - 1:
        ends = np.append(ends, len(data["rewards"]) - 1)
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        episodes.append(
            {
                "observations": np.concatenate([data["observations"][sl], data["next_observations"][end : end + 1]]),
                "actions": data["actions"][sl],
                "rewards": data["rewards"][sl],
                "terminations": data["terminals"][sl],
                "truncations": data["timeouts"][sl].copy(),
            }
        )
        episodes[-1]["truncations"][-1] = not episodes[-1]["terminations"][-1]
        start = end + 1
    return episodes


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", help="gymnasium env to roll out in")
    p.add_argument(
        "--policy", default="random", help="'random', 'pendulum-expert', 'checkpoint:PATH' or 'module:function'"
    )
    p.add_argument("--episodes", type=int, help="number of episodes to collect")
    p.add_argument("--steps", type=int, help="number of steps to collect (instead of --episodes)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian action noise std (units of half-range)")
    p.add_argument("--epsilon", type=float, default=0.0, help="probability of a uniform random action")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", help="HDF5 files to concatenate into --out instead of collecting")
    p.add_argument("--sample", action="store_true", help="draw a SAC checkpoint's actions from its policy")
    p.add_argument("--from-replay", help="a checkpoint of xql_sac.py or xql_td3.py: write its replay buffer")
    p.add_argument("--replay-steps", type=int, help="with --from-replay: only its first this many transitions")
    p.add_argument("--out", help="the D4RL-format HDF5 file to write")
    p.add_argument("--minari-id", help="also write a local Minari dataset with this id, e.g. pendulum/mine-v0")
    p.add_argument("--ref-min-score", type=float, help="return that scores 0 (D4RL: a random policy's)")
    p.add_argument("--ref-max-score", type=float, help="return that scores 100 (D4RL: an expert's)")
    a = p.parse_args()
    if not a.out and not a.minari_id:
        raise SystemExit("error: give --out FILE.hdf5 and/or --minari-id NAMESPACE/NAME-v0")
    if a.from_replay:
        episodes, env_id = replay_episodes(a.from_replay, a.replay_steps)
        data = episodes_to_d4rl(episodes)
    elif a.merge:
        parts = [read_hdf5(path) for path in a.merge]
        data = {k: np.concatenate([d[k] for d, _ in parts]) for k in KEYS}
        env_id = a.env_id or parts[0][1]["env_id"]
        episodes = d4rl_to_episodes(data)
    else:
        if not a.env_id or (a.episodes is None) == (a.steps is None):
            raise SystemExit("error: give --env-id and exactly one of --episodes or --steps (or --merge FILES)")
        env_id = a.env_id
        episodes = rollout(env_id, a.policy, a.episodes, a.steps, a.noise, a.epsilon, a.seed, sample=a.sample)
        data = episodes_to_d4rl(episodes)
    returns = np.array([e["rewards"].sum() for e in episodes])
    print(
        f"{len(episodes)} episodes, {len(data['rewards'])} transitions, return {returns.mean():.1f} "
        f"+- {returns.std():.1f} (min {returns.min():.1f}, max {returns.max():.1f})"
    )
    if a.out:
        write_hdf5(a.out, data, env_id, a.ref_min_score, a.ref_max_score)
        print(f"wrote {a.out}")
    if a.minari_id:
        write_minari(a.minari_id, episodes, env_id, a.ref_min_score, a.ref_max_score)
        print(f"wrote the local Minari dataset {a.minari_id}")
