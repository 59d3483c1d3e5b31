"""Run CORL's IQL (github.com/tinkoff-ai/CORL, algorithms/offline/iql.py, PyTorch) on one of our
D4RL-format HDF5 files, unchanged but for what running it on today's packages needs, and log what
benchmarks/sweep.py reads, so that the runner makes CORL's runs and their records as it makes ours.

CORL stays in its clone (--corl-repo PATH or $CORL_REPO). Its settings are its TrainConfig defaults
(expectile 0.7, beta 3, states normalised, batch 256, Adam 3e-4, cosine actor schedule); its own
flags go in --corl-flags; the budget, evaluation and seed come from ours. What running it here
needs (SHIMS, also in the run's record):

  - d4rl and the env: as benchmarks/parity/xql_authors_offline.py (its shim_d4rl): `qlearning_dataset`
    reads our file by D4RL's rule; gymnasium's v5 robot behind gym's old API, under the D4RL name
  - wandb: a stand-in whose `log` writes TensorBoard scalars into runs/<run name>: the losses every
    1000 steps as losses/<key>, `d4rl_normalized_score` as eval/normalized_score and, turned back
    into a return, eval/episodic_return
  - pyrallis reads the command line we build (pip install pyrallis)

    python benchmarks/parity/corl_iql.py --corl-repo /tmp/CORL --dataset data/d4rl/hopper-medium-expert.hdf5
"""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

from xql_authors_offline import REF_SCORES, check_dataset, d4rl_name, shim_d4rl, suite_parser

SHIMS = [
    "d4rl: qlearning_dataset(env) reads our HDF5 file by D4RL's rule; the env is gymnasium's v5 robot behind "
    "gym's old API with D4RL's get_normalized_score, registered under the D4RL name (xql_authors_offline.shim_d4rl)",
    "np.bool8 = np.bool_ for gym 0.26.2; gym 0.26.2's ObservationWrapper passes gym 0.24's old API through",
    "wandb: a stand-in whose log() writes TensorBoard scalars: losses every 1000 steps as losses/<key>, "
    "d4rl_normalized_score as eval/normalized_score and, as a return, eval/episodic_return",
]
LOSS_EVERY = 1000  # CORL logs every step; a scalar every 1000 steps keeps the event file small


def corl_repo(path: str | None) -> str:
    path = path or os.environ.get("CORL_REPO")
    if not path or not os.path.isfile(os.path.join(path, "algorithms", "offline", "iql.py")):
        raise SystemExit(f"error: give a clone of github.com/tinkoff-ai/CORL with --corl-repo or CORL_REPO (got {path!r})")
    return os.path.abspath(path)


def shim_wandb(run_dir: str, robot: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    low, high = REF_SCORES[robot]
    writer = SummaryWriter(run_dir)

    def log(values: dict, step: int | None = None, **kwargs) -> None:
        for key, value in values.items():
            if key == "d4rl_normalized_score":  # D4RL-normalised, times 100
                writer.add_scalar("eval/normalized_score", float(value), step)
                writer.add_scalar("eval/episodic_return", low + float(value) / 100.0 * (high - low), step)
                writer.flush()
            elif step % LOSS_EVERY == 0:
                writer.add_scalar(f"losses/{key}", float(value), step)

    run = types.SimpleNamespace(save=lambda *a, **k: None, summary={})
    sys.modules["wandb"] = types.SimpleNamespace(init=lambda *a, **k: run, log=log, run=run,
                                                 finish=lambda *a, **k: writer.close())  # fmt: skip


def main(argv=None) -> None:
    p = suite_parser(__doc__, "CORL-IQL", "accepted for suites; CORL's loop cannot resume")
    p.add_argument("--corl-repo", default=None)
    p.add_argument("--corl-flags", default="", help="iql.py's TrainConfig flags, e.g. '--beta 3 --iql_tau 0.7'")
    args = p.parse_args(argv)
    repo = corl_repo(args.corl_repo)
    check_dataset(args.dataset)
    if importlib.util.find_spec("pyrallis") is None:
        raise SystemExit("error: CORL's iql.py needs pyrallis: pip install pyrallis")
    robot, name = d4rl_name(args.dataset)
    run_name = f"{Path(args.dataset).stem}__{args.exp_name}__{args.seed}__{int(time.time())}"
    shim_d4rl(args.dataset, robot, name)
    shim_wandb(os.path.join("runs", run_name), robot)
    theirs = ["--env", name, "--seed", str(args.seed), "--max_timesteps", str(args.total_timesteps),
              "--eval_freq", str(args.eval_frequency), "--n_episodes", str(args.eval_episodes),
              "--device", "cpu", *shlex.split(args.corl_flags)]  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    with open("peer.json", "w") as f:
        json.dump({"harness": "benchmarks/parity/corl_iql.py", "peer": "github.com/tinkoff-ai/CORL algorithms/offline/iql.py",
                   "peer_commit": commit or None, "their_flags": theirs, "shims": SHIMS}, f)  # fmt: skip
    # SIGTERM (a stop of the runner): CORL's loop has no resumable checkpoint; exit as a stopped run
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    print(f"CORL's iql.py on {args.dataset} as {name}, {commit[:12]}: {' '.join(theirs)}", flush=True)
    spec = importlib.util.spec_from_file_location("corl_iql", os.path.join(repo, "algorithms", "offline", "iql.py"))
    iql = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(iql)
    sys.argv = ["iql.py", *theirs]
    iql.train()
    sys.modules["wandb"].finish()


if __name__ == "__main__":
    main()
