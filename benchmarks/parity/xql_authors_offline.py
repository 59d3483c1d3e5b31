"""Run the authors' offline X-QL (github.com/Div99/XQL, offline/train_offline.py: JAX and flax) on one
of our D4RL-format HDF5 files, unchanged but for what running it on today's packages needs, and log
what benchmarks/sweep.py reads.

Their code stays in their clone (--authors-repo PATH or $XQL_AUTHORS_REPO). Their own flags (the
reproduce scripts' `--temp=5 --max_clip=7 --double=True` ...) go in --authors-flags; the budget,
evaluation and seed come from ours. What running it here needs (SHIMS, also in the run's record):

  - jax: `jax.tree_multimap` aliased to `jax.tree_util.tree_map`; `from jax.config import config`
    given a module; flax's init returning FrozenDicts; jax.jit given only the static_argnames its
    function has (as benchmarks/parity/xql_offline_update.py)
  - tensorflow-probability's JAX substrate from tfp-nightly
  - d4rl (not installable here, and its files not downloadable): a `d4rl` module whose
    `qlearning_dataset(env)` reads our file with D4RL's own rule (s_i, a_i, r_i, s_{i+1},
    terminal_i; the rows where a time-out ends an episode dropped); the env is gymnasium's v5 robot
    with D4RL's observation layout behind gym's old API (reset gives the observation, step four
    values, `seed`, D4RL's `get_normalized_score`), registered in gym under the D4RL name
  - wandb: a stand-in that records nothing; tensorboardX: torch's SummaryWriter, writing into
    runs/<run name>, their `evaluation/average_returns` (D4RL-normalised, as their EpisodeMonitor
    gives it) also as `eval/normalized_score` and, turned back into a return, `eval/episodic_return`
  - `np.bool8` aliased to `np.bool_` for gym 0.26.2 under NumPy 2; gym 0.26.2's ObservationWrapper
    given gym 0.24's pass-through of the old API, which their wrappers were written for

    python benchmarks/parity/xql_authors_offline.py --authors-repo /tmp/XQL \
        --dataset data/d4rl/hopper-medium.hdf5 --authors-flags "--temp=5 --max_clip=7 --double=True"
"""

import argparse
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
REF_SCORES = dict(hopper=(-20.272305, 3234.3), halfcheetah=(-280.178953, 12135.0), walker2d=(1.629008, 4592.3))
ROBOTS = dict(hopper="Hopper-v5", halfcheetah="HalfCheetah-v5", walker2d="Walker2d-v5")
SHIMS = [
    "jax.tree_multimap = jax.tree_util.tree_map; a jax.config module for `from jax.config import config`",
    "flax.config.update('flax_return_frozendict', True)",
    "jax.jit keeps only the static_argnames its function has",
    "tensorflow_probability from tfp-nightly",
    "d4rl: qlearning_dataset(env) reads our HDF5 file by D4RL's rule; the env is gymnasium's v5 robot behind "
    "gym's old API with D4RL's get_normalized_score, registered under the D4RL name",
    "wandb: a stand-in that records nothing",
    "tensorboardX: torch's SummaryWriter into runs/<run name>; evaluation/average_returns also logged as "
    "eval/normalized_score and, as a return, eval/episodic_return",
    "np.bool8 = np.bool_ for gym 0.26.2's env checker",
    "gym 0.26.2's ObservationWrapper.reset and .step pass gym 0.24's old API through, as their wrappers expect",
]


def authors_repo(path: str | None) -> str:
    path = path or os.environ.get("XQL_AUTHORS_REPO")
    if not path or not os.path.isfile(os.path.join(path, "offline", "train_offline.py")):
        raise SystemExit(f"error: give a clone of github.com/Div99/XQL with --authors-repo or XQL_AUTHORS_REPO (got {path!r})")
    return os.path.abspath(path)


def d4rl_name(dataset: str) -> tuple[str, str]:
    """data/d4rl/hopper-medium.hdf5 -> ('hopper', 'hopper-medium-v2'), the name their script keys on."""
    stem = Path(dataset).stem
    robot = re.match(r"(hopper|halfcheetah|walker2d)", stem)
    if not robot:
        raise SystemExit(f"error: --dataset {dataset}: the name must start with hopper, halfcheetah or walker2d")
    return robot.group(1), f"{stem}-v2"


def shim_jax() -> None:
    import flax
    import jax

    jax.tree_multimap = jax.tree_util.tree_map
    sys.modules["jax.config"] = types.SimpleNamespace(config=jax.config)
    flax.config.update("flax_return_frozendict", True)
    jit = jax.jit

    def lenient_jit(fun=None, **kw):
        if fun is None:
            return lambda f: lenient_jit(f, **kw)
        names = kw.get("static_argnames")
        if names:
            names = [names] if isinstance(names, str) else names
            kw["static_argnames"] = tuple(n for n in names if n in inspect.signature(fun).parameters)
        return jit(fun, **kw)

    jax.jit = lenient_jit


def shim_d4rl(dataset: str, robot: str, name: str) -> None:
    """A `d4rl` module and a gym env under the D4RL name, both backed by our file and gymnasium."""
    import gym
    import gymnasium
    import h5py

    np.bool8 = np.bool_
    low, high = REF_SCORES[robot]

    class D4RLStyleEnv(gym.Env):
        """gymnasium's robot behind gym's old API, as D4RL's envs are."""

        def __init__(self):
            self._env = gymnasium.make(ROBOTS[robot])
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, self._env.observation_space.shape, np.float64)
            space = self._env.action_space
            self.action_space = gym.spaces.Box(space.low, space.high, space.shape, np.float32)
            self._seed = None

        def seed(self, seed=None):
            self._seed = seed

        def reset(self, **kwargs):
            obs, _ = self._env.reset(seed=self._seed)
            self._seed = None  # seeded once, as gym's env.seed was
            return obs

        def step(self, action):
            obs, reward, terminated, truncated, info = self._env.step(action)
            return obs, reward, terminated or truncated, info

        def get_normalized_score(self, score):
            return (score - low) / (high - low)

    gym.envs.registration.register(id=name, entry_point=lambda: D4RLStyleEnv(), disable_env_checker=True)
    # their wrappers were written for gym <= 0.24, whose ObservationWrapper passed the old API through
    gym.ObservationWrapper.reset = lambda self, **kwargs: self.observation(self.env.reset(**kwargs))

    def observation_step(self, action):
        obs, reward, done, info = self.env.step(action)
        return self.observation(obs), reward, done, info

    gym.ObservationWrapper.step = observation_step

    def qlearning_dataset(env, **kwargs):
        with h5py.File(dataset, "r") as f:
            raw = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
        keep = np.flatnonzero(~raw["timeouts"][:-1].astype(bool))  # D4RL drops the time-out rows
        return dict(observations=raw["observations"][keep], actions=raw["actions"][keep],
                    next_observations=raw["observations"][keep + 1], rewards=raw["rewards"][keep],
                    terminals=raw["terminals"][keep].astype(bool))

    sys.modules["d4rl"] = types.SimpleNamespace(qlearning_dataset=qlearning_dataset)


def shim_logging(run_dir: str, robot: str) -> None:
    from torch.utils.tensorboard import SummaryWriter as TorchWriter

    low, high = REF_SCORES[robot]

    class SummaryWriter(TorchWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(run_dir)

        def add_scalar(self, tag, value, step=None, *args, **kwargs):
            value = float(np.asarray(value))  # their values are jax arrays
            super().add_scalar(tag, value, step)
            if tag == "evaluation/average_returns":  # EpisodeMonitor's: D4RL-normalised, times 100
                super().add_scalar("eval/normalized_score", value, step)
                super().add_scalar("eval/episodic_return", low + float(value) / 100.0 * (high - low), step)

        def add_histogram(self, tag, values, step=None, *args, **kwargs):
            super().add_histogram(tag, np.asarray(values), step)

    sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    run = types.SimpleNamespace(summary={})
    sys.modules["wandb"] = types.SimpleNamespace(
        init=lambda *a, **k: run, config=types.SimpleNamespace(update=lambda *a, **k: None), run=run,
        finish=lambda *a, **k: None, Settings=lambda *a, **k: None,
    )


def suite_parser(doc: str, peer: str, exp_name: str) -> argparse.ArgumentParser:
    """The flags benchmarks/sweep.py passes to a harness that runs a peer's offline code on our file."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a D4RL-format HDF5 file named like hopper-medium.hdf5")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=100_000)
    p.add_argument("--eval-frequency", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--exp-name", default=exp_name)
    p.add_argument("--checkpoint-frequency", type=int, default=0, help=f"accepted for suites; {peer} cannot resume")
    return p


def check_dataset(path: str) -> None:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --dataset {path}: no such file (tools/make_d4rl_datasets.py makes them)")


def main(argv=None) -> None:
    p = suite_parser(__doc__, "their loop", "authors")
    p.add_argument("--authors-repo", default=None)
    p.add_argument("--authors-flags", default="", help="their train_offline.py flags, e.g. '--temp=5 --max_clip=7'")
    args = p.parse_args(argv)
    repo = authors_repo(args.authors_repo)
    check_dataset(args.dataset)
    robot, name = d4rl_name(args.dataset)
    run_name = f"{Path(args.dataset).stem}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    shim_jax()
    shim_d4rl(args.dataset, robot, name)
    shim_logging(run_dir, robot)
    theirs = [f"--env_name={name}", f"--seed={args.seed}", f"--max_steps={args.total_timesteps}",
              f"--eval_interval={args.eval_frequency}", f"--eval_episodes={args.eval_episodes}",
              f"--log_interval={min(1000, args.eval_frequency)}", "--save_dir=authors_out",
              f"--config={os.path.join(repo, 'offline', 'configs', 'mujoco_config.py')}",
              *shlex.split(args.authors_flags)]  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    with open("peer.json", "w") as f:
        json.dump({"harness": "benchmarks/parity/xql_authors_offline.py",
                   "peer": "github.com/Div99/XQL offline/train_offline.py", "peer_commit": commit or None,
                   "their_flags": theirs, "shims": SHIMS}, f)  # fmt: skip
    # SIGTERM (a stop of the runner): their loop has no resumable checkpoint; exit as a stopped run
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    print(f"authors' train_offline.py on {args.dataset} as {name}, {commit[:12]}: {' '.join(theirs)}", flush=True)
    sys.path.insert(0, os.path.join(repo, "offline"))
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    spec = importlib.util.spec_from_file_location("train_offline", os.path.join(repo, "offline", "train_offline.py"))
    train_offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_offline)
    from absl import app

    app.run(train_offline.main, argv=["train_offline.py", *theirs])


if __name__ == "__main__":
    main()
