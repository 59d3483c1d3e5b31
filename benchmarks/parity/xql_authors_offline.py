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
  - NumPy's global generator, which draws their batches and which their main() never seeds, seeded
    with --seed, so that a run repeats
  - resuming, which their loop lacks: every --checkpoint-frequency steps and on SIGTERM the learner
    (its four models with their optimiser states, and its JAX key), NumPy's global state (their batch
    sampler), the evaluation env's generator and the best evaluation so far go to
    runs/<run name>/checkpoint.pt; `--resume` that file rebuilds them and starts their loop after its
    step, so that a stopped run goes on as if it had not stopped (benchmarks/sweep.py resumes so)

    python benchmarks/parity/xql_authors_offline.py --authors-repo /tmp/XQL \
        --dataset data/d4rl/hopper-medium.hdf5 --authors-flags "--temp=5 --max_clip=7 --double=True"
"""

import argparse
import importlib.util
import inspect
import json
import os
import pickle
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
    "np.random.seed(seed) before their main(), which never seeds the generator that draws their batches",
    "resume: the learner's models and JAX key, NumPy's global state, the evaluation env's generator and the best "
    "evaluation saved at a step boundary; their loop's range starts after the saved step",
]
ENVS = []  # the D4RL-style envs made, so that a checkpoint can keep the evaluation env's generator
BEST = [-np.inf]  # the best evaluation so far, which their loop keeps in a local
STOP = [False]  # set by SIGTERM (a stop of the runner); their loop is stopped at the next step boundary


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

    gym.envs.registration.register(id=name, entry_point=lambda: ENVS.append(D4RLStyleEnv()) or ENVS[-1],
                                   disable_env_checker=True)
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
            if tag == "evaluation/best_returns":  # theirs counts from the resume; the best of the whole run
                value = max(value, BEST[0])
            super().add_scalar(tag, value, step)
            if tag == "evaluation/average_returns":  # EpisodeMonitor's: D4RL-normalised, times 100
                BEST[0] = max(BEST[0], value)
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


def suite_parser(doc: str, exp_name: str, checkpoint_help: str) -> argparse.ArgumentParser:
    """The flags benchmarks/sweep.py passes to a harness that runs a peer's offline code on our file."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a D4RL-format HDF5 file named like hopper-medium.hdf5")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=100_000)
    p.add_argument("--eval-frequency", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--exp-name", default=exp_name)
    p.add_argument("--checkpoint-frequency", type=int, default=0, help=checkpoint_help)
    return p


def check_dataset(path: str) -> None:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --dataset {path}: no such file (tools/make_d4rl_datasets.py makes them)")


def shim_resume(train_offline, run_dir: str, argv: list[str], every: int, saved: dict | None) -> None:
    """Checkpoints of their loop at step boundaries (every `every` steps, and on SIGTERM), and a loop
    that starts after `saved`'s step with its state, which goes on as the unstopped run would."""
    import builtins

    import flax
    import jax

    start, done, learner = (saved or {}).get("step", 0), [(saved or {}).get("step", 0)], []
    keys = ("actor", "critic", "value", "target_critic", "rng")

    class ResumedLearner(train_offline.Learner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)  # after make_env_and_dataset: the env is made and seeded
            learner.append(self)
            if saved:
                state = flax.serialization.from_bytes({k: getattr(self, k) for k in keys}, saved["learner"])
                for k in keys:
                    setattr(self, k, jax.tree_util.tree_map(jax.numpy.asarray, state[k]))
                np.random.set_state(saved["numpy"])
                env = ENVS[-1]
                env._seed = saved["env_seed"]
                if saved["env_generator"] is not None:
                    env._env.unwrapped.np_random = np.random.Generator(np.random.PCG64())
                    env._env.unwrapped.np_random.bit_generator.state = saved["env_generator"]
                BEST[0] = saved["best"]

    def save(step: int) -> None:
        env, model = ENVS[-1], learner[0]
        generator = env._env.unwrapped._np_random
        state = dict(argv=argv, step=step, numpy=np.random.get_state(), best=BEST[0], env_seed=env._seed,
                     env_generator=None if generator is None else generator.bit_generator.state,
                     learner=flax.serialization.to_bytes({k: getattr(model, k) for k in keys}))  # fmt: skip
        path = os.path.join(run_dir, "checkpoint.pt")
        with open(path + ".tmp", "wb") as f:
            pickle.dump(state, f)
        os.replace(path + ".tmp", path)

    sample = train_offline.D4RLDataset.sample

    def sample_at_step_boundary(self, batch_size):  # called first in each step of their loop
        if STOP[0] or (every and done[0] > start and done[0] % every == 0):
            save(done[0])
            if STOP[0]:
                print(f"stopped at step {done[0]}: {run_dir}/checkpoint.pt; --resume it to go on", flush=True)
                sys.exit(128 + signal.SIGTERM)
        done[0] += 1
        return sample(self, batch_size)

    train_offline.Learner = ResumedLearner
    train_offline.D4RLDataset.sample = sample_at_step_boundary
    # their loop is `for i in range(1, FLAGS.max_steps + 1)`: a resumed one starts after the saved step
    train_offline.range = lambda *a: builtins.range(start + 1, a[1]) if a[0] == 1 and len(a) == 2 else builtins.range(*a)


def main(argv=None) -> None:
    p = suite_parser(__doc__, "authors", "saved every this many steps, and on SIGTERM, for --resume")
    p.add_argument("--authors-repo", default=None)
    p.add_argument("--authors-flags", default="", help="their train_offline.py flags, e.g. '--temp=5 --max_clip=7'")
    p.add_argument("--resume", default=None, help="runs/<run name>/checkpoint.pt: go on from it, with its flags")
    signal.signal(signal.SIGTERM, lambda sig, frame: STOP.__setitem__(0, True))  # checkpoint at the next step
    resume = argparse.ArgumentParser(add_help=False)
    resume.add_argument("--resume")
    saved, argv = None, list(sys.argv[1:] if argv is None else argv)
    path = resume.parse_known_args(argv)[0].resume
    if path:  # the run's own flags, from its checkpoint
        with open(path, "rb") as f:
            saved = pickle.load(f)
        argv = saved["argv"]
    args = p.parse_args(argv)
    args.resume = path
    repo = authors_repo(args.authors_repo)
    check_dataset(args.dataset)
    robot, name = d4rl_name(args.dataset)
    run_name = f"{Path(args.dataset).stem}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if saved else os.path.join("runs", run_name)
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
    print(f"authors' train_offline.py on {args.dataset} as {name}, {commit[:12]}: {' '.join(theirs)}", flush=True)
    if saved:
        print(f"resumed {args.resume} at step {saved['step']} of {args.total_timesteps}", flush=True)
    sys.path.insert(0, os.path.join(repo, "offline"))
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    spec = importlib.util.spec_from_file_location("train_offline", os.path.join(repo, "offline", "train_offline.py"))
    train_offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_offline)
    shim_resume(train_offline, run_dir, argv, args.checkpoint_frequency, saved)
    np.random.seed(args.seed)  # their loop never seeds NumPy, whose global generator draws their batches
    from absl import app

    app.run(train_offline.main, argv=["train_offline.py", *theirs])


if __name__ == "__main__":
    main()
