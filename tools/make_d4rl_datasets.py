"""D4RL's MuJoCo datasets made again with this repository's own SAC: medium, medium-replay,
medium-expert (and expert) for Hopper-v5 and HalfCheetah-v5, in D4RL's HDF5 format.

D4RL's recipe (Fu et al. 2020), followed here:
  expert         1M transitions of a SAC policy trained to the end of its run
  medium         1M transitions of the same run's policy when it first reached a third of the expert's
  medium-replay  the run's replay buffer up to that medium policy (every transition it saw)
  medium-expert  medium and expert together (2M transitions)
The actions are sampled from the SAC policy (D4RL's files carry their actions' log-probabilities:
they are the policy's draws, not its mean). Episodes end at 1000 steps, recorded as timeouts.

    python tools/make_d4rl_datasets.py                     # both envs, into data/d4rl/
    python tools/make_d4rl_datasets.py --envs Hopper-v5 --expert-steps 500000
    python tools/make_d4rl_datasets.py --envs Hopper-v5 --datasets medium \
        --policies-from results/offline-d4rl/datasets.json  # SAC to the committed medium step only

One SAC run per env (xql_sac.py --value-loss sac, seed 1, a 1M-step run stopped at --expert-steps),
in chunks of 10k steps; after each chunk its actor is kept as a snapshot with its evaluation (10
episodes). The expert is the best-evaluated snapshot, the medium the first snapshot whose
evaluation reaches a third of the expert's normalised score. Everything is resumable: run the
same command again after a stop (a chunk stopped part-way is trained again from its start, so the
run is the same as one never stopped), or with a larger --expert-steps to train on (the data is then
made again). With --policies-from a summary.json already made (results/offline-d4rl/datasets.json),
the expert and medium steps are that file's, SAC trains only as far as the --datasets asked for need
(hopper-medium: 80k steps, not 300k) and its evaluations must equal the file's. SAC runs on one thread (the data repeat exactly only so), 42 to 49 steps/s on one
core of a 2-core machine: 300k steps take about two hours per env, each 1M-transition rollout 12-13 min.
Writes OUT/<env>-<dataset>.hdf5 and OUT/summary.json (the datasets' returns, normalised by
D4RL's reference scores, and the SAC run's evaluations).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
from make_offline_dataset import episodes_to_d4rl, read_hdf5, replay_episodes, rollout, write_hdf5

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
D4RL_REF_SCORES = dict(hopper=(-20.272305, 3234.3), halfcheetah=(-280.178953, 12135.0),
                       walker2d=(1.629008, 4592.3))  # D4RL's random and expert returns: 0 and 100
DATASETS = ("medium", "medium-replay", "medium-expert", "expert")
CHUNK = 10000  # steps between snapshots, one evaluation each
SAC_FLAGS = ["--value-loss", "sac", "--seed", "1", "--total-timesteps", "1000000",
             "--eval-frequency", str(CHUNK), "--eval-episodes", "10", "--exp-name", "d4rl-sac"]


def train_sac(env_id: str, folder: str, steps: int) -> dict:
    """Run SAC on `env_id` up to `steps` in chunks, keeping an actor snapshot after each; resumes
    where it stopped. Returns {step: evaluation return} of the snapshots."""
    os.makedirs(f"{folder}/snapshots", exist_ok=True)
    log = f"{folder}/sac.log"
    for stop in range(CHUNK, steps + 1, CHUNK):
        if os.path.exists(f"{folder}/snapshots/{stop:07d}.pt"):
            continue
        ckpt = glob.glob(f"{folder}/runs/*/checkpoint.pt")
        if ckpt and torch.load(ckpt[0], weights_only=False)["global_step"] != stop - CHUNK:
            # stopped inside the chunk: MuJoCo resumes in a new episode, so go back to its start
            if stop == CHUNK:
                shutil.rmtree(os.path.dirname(ckpt[0]))
                ckpt = []
            elif os.path.exists(f"{folder}/chunk.pt"):
                shutil.copyfile(f"{folder}/chunk.pt", ckpt[0])
            else:
                sys.exit(f"error: SAC stopped inside a chunk and {folder}/chunk.pt is missing; "
                         f"remove {folder}/runs and {folder}/snapshots to train again from the start")
        start = ["--resume", os.path.abspath(ckpt[0])] if ckpt else ["--env-id", env_id, *SAC_FLAGS]
        cmd = [sys.executable, f"{ROOT}/xql_sac.py", *start, "--stop-at", str(stop), "--no-cuda"]
        # one thread: with two, the same seed gives other SAC runs and so other datasets
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log, "a") as out:
            if subprocess.run(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"error: SAC stopped before step {stop}; see {log}")
        (ckpt,) = glob.glob(f"{folder}/runs/*/checkpoint.pt")
        shutil.copyfile(ckpt, f"{folder}/chunk.pt.tmp")  # where a stop inside the next chunk goes back to
        os.replace(f"{folder}/chunk.pt.tmp", f"{folder}/chunk.pt")  # renamed: a kill mid-copy keeps the last whole one
        checkpoint = torch.load(ckpt, weights_only=False)
        keep = {k: checkpoint[k] for k in ("script", "args", "run_name", "global_step", "actor")}
        torch.save(keep, f"{folder}/snapshots/tmp.pt")
        os.replace(f"{folder}/snapshots/tmp.pt", f"{folder}/snapshots/{stop:07d}.pt")  # a snapshot is whole
        print(f"{env_id}: SAC at step {stop}, evaluation {evaluations(log).get(stop, float('nan')):.1f}")
    evals = evaluations(log)
    return {s: evals[s] for s in range(CHUNK, steps + 1, CHUNK)}


def evaluations(log: str) -> dict:
    """{step: mean evaluation return} from the SAC log (the last value where a chunk ran twice)."""
    found = re.findall(r"^step (\d+): eval return (-?[\d.]+)", open(log).read(), re.MULTILINE)
    return {int(step): float(value) for step, value in found}


def choose_policies(evals: dict, ref: tuple) -> tuple:
    """(expert, medium) steps: the best evaluation, and the first one to reach a third of its
    normalised score, the run stopped early as D4RL's medium was (not the snapshot closest to a
    third: a late, strong policy with one bad evaluation would be); (None, None) if the first is best."""
    norm = {s: 100 * (r - ref[0]) / (ref[1] - ref[0]) for s, r in evals.items()}
    expert = max(evals, key=evals.get)
    earlier = sorted(s for s in evals if s < expert and norm[s] >= norm[expert] / 3)
    return (expert, earlier[0]) if earlier else (None, None)


def summary(data: dict, ref: tuple) -> dict:
    """Transitions, episodes and episode returns (raw and normalised) of a D4RL-format dataset."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    returns = np.array([r.sum() for r in np.split(data["rewards"], ends[:-1] + 1)])
    norm = lambda x: round(100 * (float(x) - ref[0]) / (ref[1] - ref[0]), 1)  # noqa: E731
    return dict(transitions=len(data["rewards"]), episodes=len(returns),
                return_mean=round(float(returns.mean()), 1), return_min=round(float(returns.min()), 1),
                return_max=round(float(returns.max()), 1), normalised_mean=norm(returns.mean()),
                terminals=int(data["terminals"].sum()), timeouts=int(data["timeouts"].sum()))


def make(env_id: str, out: str, steps: int, transitions: int, names=DATASETS, known: dict | None = None) -> dict:
    """The datasets `names` of one env (medium-expert brings medium and expert); returns their
    summaries and the choice of policies, made from the SAC run or taken from `known` (a summary)."""
    robot = env_id.split("-")[0].lower()
    ref = D4RL_REF_SCORES[robot]
    folder = f"{out}/sac-{env_id}"
    names = set(names) | ({"medium", "expert"} if "medium-expert" in names else set())
    if known:  # the committed choice: SAC trains only to the last policy the datasets need
        expert, medium = known["expert_step"], known["medium_step"]
        steps = max(expert if name in ("expert", "medium-expert") else medium for name in names)
    evals = train_sac(env_id, folder, steps)
    if known:
        differ = [s for s in evals if evals[s] != known["evaluations"].get(str(s))]
        if differ:
            sys.exit(f"error: {env_id}: SAC's evaluation at step {differ[0]} is {evals[differ[0]]}, "
                     f"not {known['evaluations'].get(str(differ[0]))}: not the run --policies-from describes")
    else:
        expert, medium = choose_policies(evals, ref)
    if expert is None:
        sys.exit(f"error: {env_id}: SAC's first evaluation is its best; train on (--expert-steps)")
    info = dict(env_id=env_id, sac_steps=steps, expert_step=expert,
                expert_eval=known["expert_eval"] if known else evals[expert], medium_step=medium,
                medium_eval=evals[medium], evaluations=evals, datasets={})
    made = f"{folder}/made.json"  # the policies the files were made from: made again if they change
    stale = not os.path.exists(made) or json.load(open(made)) != [expert, medium, transitions]
    path = lambda name: f"{out}/{robot}-{name}.hdf5"  # noqa: E731
    for name, step, seed in (("medium", medium, 1), ("expert", expert, 2)):
        if name in names and (stale or not os.path.exists(path(name))):
            policy = f"checkpoint:{folder}/snapshots/{step:07d}.pt"
            episodes = rollout(env_id, policy, steps=transitions, seed=seed, sample=True)
            write_hdf5(path(name), episodes_to_d4rl(episodes), env_id, *ref)
    if "medium-replay" in names and (stale or not os.path.exists(path("medium-replay"))):
        episodes, _ = replay_episodes(glob.glob(f"{folder}/runs/*/checkpoint.pt")[0], medium)
        write_hdf5(path("medium-replay"), episodes_to_d4rl(episodes), env_id, *ref)
    if "medium-expert" in names and (stale or not os.path.exists(path("medium-expert"))):
        parts = [read_hdf5(path(name))[0] for name in ("medium", "expert")]
        write_hdf5(path("medium-expert"), {k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
                   env_id, *ref)
    json.dump([expert, medium, transitions], open(made, "w"))
    for name in DATASETS:
        if os.path.exists(path(name)):
            info["datasets"][f"{robot}-{name}"] = summary(read_hdf5(path(name))[0], ref)
    return info


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"], help="gymnasium MuJoCo envs")
    p.add_argument("--expert-steps", type=int, default=300000, help="SAC steps of the expert's run")
    p.add_argument("--transitions", type=int, default=1000000, help="transitions of medium and of expert")
    p.add_argument("--out", default="data/d4rl", help="folder of the datasets (git ignores data/)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="which to make")
    p.add_argument("--policies-from", help="a summary.json made before: its expert and medium steps, "
                   "SAC trained only as far as --datasets need (--expert-steps unused)")
    a = p.parse_args()
    if a.policies_from and not os.path.isfile(a.policies_from):
        sys.exit(f"error: --policies-from {a.policies_from} is not a file; give a summary.json such as "
                 "results/offline-d4rl/datasets.json")
    known = json.load(open(a.policies_from)) if a.policies_from else {}
    for env_id in a.envs:
        if env_id.split("-")[0].lower() not in D4RL_REF_SCORES:
            sys.exit(f"error: --envs {env_id}: D4RL scores only Hopper, HalfCheetah and Walker2d")
        if a.policies_from and env_id not in known:
            sys.exit(f"error: --policies-from {a.policies_from} has no {env_id}; make it without --policies-from")
    if a.expert_steps < 2 * CHUNK or a.expert_steps % CHUNK or a.expert_steps > 1000000:
        sys.exit(f"error: --expert-steps must be a multiple of {CHUNK} from {2 * CHUNK} to 1000000 (the SAC run)")
    if a.transitions < 1:
        sys.exit(f"error: --transitions must be >= 1 (got {a.transitions})")
    torch.set_num_threads(1)
    results = {}
    if os.path.exists(f"{a.out}/summary.json"):
        results = json.load(open(f"{a.out}/summary.json"))
    for env_id in a.envs:
        results[env_id] = make(env_id, a.out, a.expert_steps, a.transitions, a.datasets, known.get(env_id))
        json.dump(results, open(f"{a.out}/summary.json", "w"), indent=1)
        for name, s in results[env_id]["datasets"].items():
            print(f"{name}: {s['transitions']} transitions, {s['episodes']} episodes, return "
                  f"{s['return_mean']} ({s['return_min']} to {s['return_max']}), "
                  f"normalised {s['normalised_mean']}")
