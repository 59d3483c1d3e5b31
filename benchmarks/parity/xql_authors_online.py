"""Run the authors' online X-SAC (github.com/Div99/XQL, online/) on DeepMind Control, unchanged but
for what running it on today's packages needs, and log what benchmarks/sweep.py reads.

Their code stays in their clone (--authors-repo PATH or $XQL_AUTHORS_REPO); nothing of it is copied
here. Their config (online/configs/xsac.yaml) is loaded and only the settings given as flags are
replaced: width, batch size, learning rates and beta, so that a run can stand beside one of
xql_sac.py at the same sizes. Everything else stays theirs (orthogonal init, initial temperature
0.1, z clipped to [-10, 10], V and target updates every 2 steps, one actor update per 2 steps).

What running it here needs (SHIMS below, also written to the run's record):
  - their `research` package on sys.path (their setup.py installs it; we do not install it)
  - gym 0.26.2 beside gymnasium (benchmarks/parity/requirements.txt)
  - `np.bool8`, removed in NumPy 2, aliased to `np.bool_` for gym 0.26.2's environment checker
  - seeding: their trainer's `model.seed(...)` is commented out; we seed torch, numpy and random
    and their env as their own `Algorithm.seed` would
  - per-network learning rates: their config has one Adam learning rate for all; we set the
    actor's param group to --policy-lr and the critics', value's and temperature's to --q-lr
  - TensorBoard tags: `eval/reward` is also logged as `eval/episodic_return` and
    `time/steps_per_second` as `charts/SPS`, the tags sweep.py reads

    python benchmarks/parity/xql_authors_online.py --authors-repo /tmp/XQL \
        --env-id dm_control/walker-run-v0 --beta 1 --seed 3 --total-timesteps 300000
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

SHIMS = [
    "their online/ folder on sys.path (instead of `pip install -e online`)",
    "gym==0.26.2 installed beside gymnasium",
    "np.bool8 = np.bool_ (removed in NumPy 2; gym 0.26.2's env checker uses it)",
    "seeding by the harness: torch, numpy, random, the env's spaces and dm_control's task_kwargs random "
    "(their trainer's model.seed is commented out)",
    "per-network learning rates set on their Adam param groups after construction",
    "eval/reward also logged as eval/episodic_return, time/steps_per_second as charts/SPS",
]


def dmc_name(env_id: str) -> str:
    """dm_control/walker-run-v0 -> WalkerRun-v0, the name their research.envs registers."""
    if not env_id.startswith("dm_control/"):
        raise SystemExit(f"error: --env-id {env_id}: the authors' online code runs DeepMind Control only")
    domain, task = env_id.split("/")[1].rsplit("-v", 1)[0].split("-", 1)
    return f"{domain.capitalize()}{task.replace('-', '_').capitalize()}-v0"


def authors_repo(path: str | None) -> str:
    path = path or os.environ.get("XQL_AUTHORS_REPO")
    if not path or not os.path.isdir(os.path.join(path, "online", "research")):
        raise SystemExit(
            "error: give a clone of github.com/Div99/XQL with --authors-repo PATH or XQL_AUTHORS_REPO"
            f" (got {path!r}: no online/research in it)"
        )
    return os.path.abspath(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", default=None)
    p.add_argument("--env-id", default="dm_control/walker-run-v0")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--total-timesteps", type=int, default=300000)
    p.add_argument("--eval-frequency", type=int, default=10000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=256, help="theirs: 1024")
    p.add_argument("--batch-size", type=int, default=256, help="theirs: 1024")
    p.add_argument("--policy-lr", type=float, default=3e-4, help="theirs: 1e-4")
    p.add_argument("--q-lr", type=float, default=1e-3, help="critics, V and temperature; theirs: 1e-4")
    p.add_argument("--learning-starts", type=int, default=5000, help="random actions before learning (theirs too)")
    p.add_argument("--exp-name", default="authors")
    p.add_argument("--checkpoint-frequency", type=int, default=0, help="accepted for suites; their code has none")
    args = p.parse_args(argv)
    repo = authors_repo(args.authors_repo)
    sys.path.insert(0, os.path.join(repo, "online"))

    import numpy as np

    np.bool8 = np.bool_  # shim: gym 0.26.2's passive env checker still names it
    import torch
    import yaml
    from research.utils import logger as their_logger
    from research.utils.config import Config
    from research.utils.trainer import get_model

    with open(os.path.join(repo, "online", "configs", "xsac.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["env"] = dmc_name(args.env_id)
    spec["seed"] = args.seed
    spec["env_kwargs"] = {"task_kwargs": {"random": args.seed}}  # dm_control's own seed of the task
    spec["alg_kwargs"].update(beta=args.beta, init_steps=args.learning_starts)
    spec["dataset_kwargs"]["batch_size"] = args.batch_size
    for key in ("actor_kwargs", "critic_kwargs", "value_kwargs"):
        spec["network_kwargs"][key]["hidden_layers"] = [args.hidden_size, args.hidden_size]
    spec["train_kwargs"].update(
        total_steps=args.total_timesteps, eval_freq=args.eval_frequency, eval_ep=args.eval_episodes
    )
    config = Config()
    config.update(spec)

    # their Logger: also record the tags sweep.py reads
    aliases = {"eval/reward": "eval/episodic_return", "time/steps_per_second": "charts/SPS"}
    record = their_logger.Logger.record

    def record_with_aliases(self, key, value):
        record(self, key, value)
        if key in aliases:
            record(self, aliases[key], value)

    their_logger.Logger.record = record_with_aliases

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    path = os.path.join("runs", run_name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    peer = {
        "harness": "benchmarks/parity/xql_authors_online.py",
        "peer": "github.com/Div99/XQL online/ (GumbelSAC, configs/xsac.yaml)",
        "peer_commit": commit or None,
        "shims": SHIMS,
        "config": spec,
    }
    with open("peer.json", "w") as f:
        json.dump(peer, f)

    # SIGTERM (a stop of the runner): their code has no resumable checkpoint; exit as a stopped run
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = get_model(config, device="cpu")
    model.env.seed(args.seed)  # their DMControlEnv.seed: the action and observation spaces
    for name, optim in model.optim.items():
        for group in optim.param_groups:
            group["lr"] = args.policy_lr if name == "actor" else args.q_lr
    print(f"authors' GumbelSAC {spec['env']} beta {args.beta} seed {args.seed}, {commit[:12]}, {path}", flush=True)
    os.makedirs(path)
    config.save(path)
    model.train(path, **spec["train_kwargs"])


if __name__ == "__main__":
    main()
