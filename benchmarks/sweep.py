"""Run a benchmark suite (script x flags x env x seed) as Ray tasks and keep each run's outcome as
plain files under results/<suite>/.

A suite is a TOML file (see benchmarks/suites/): which envs or datasets, which seeds, which
variants (a script and its flags), the flags every run shares, and how many cores one run takes.
Each run becomes one Ray task that reserves that many CPUs and runs the script with as many
torch/OMP threads, so a local `ray.init()` runs one single-core run per core.

For each finished run the driver writes
    results/<suite>/<env>__<variant>__<seed>.csv    env_id, variant, seed, step, eval_return
                                                    (+ normalized_score when the script logs it,
                                                    + the suite's [columns]: the mean of a logged
                                                    tag since the evaluation before, e.g. the
                                                    training return or the policy's entropy)
    results/<suite>/<env>__<variant>__<seed>.json   one metadata line: command, flags, commit,
                                                    wall time, SPS, peak memory, machine
both taken from the run's TensorBoard events. A run whose CSV exists is skipped, so a suite can be
rerun after an interruption, or on another machine, and the results accumulate. A run stopped
part-way (Ctrl-C, SIGTERM, a job's time limit: every script checkpoints then, and every
--checkpoint-frequency steps if the suite's flags ask) continues from its checkpoint on the rerun,
on the same machine and --workdir. `--rewrite` makes the CSVs of done runs again from their
events in --workdir, for columns added to a suite after its runs. A run that fails is reported with the tail of its log while the
others go on.

    pip install -r benchmarks/requirements.txt
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml                  # local, one run per core
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml --dry-run        # list the runs
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml --address auto   # join a Ray cluster
    python benchmarks/plot.py results/mujoco                                  # curves and tables

On a cluster (`--address`), the repository is shipped to the workers as Ray's working_dir, and
only the CSV rows and metadata travel back: the TensorBoard events stay on the worker.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One run of a suite: a script with its flags, on one env (or dataset), with one seed."""

    suite: str
    env: str
    variant: str
    seed: int
    script: str
    args: list[str] = field(default_factory=list)
    cores: int = 1
    columns: dict[str, str] = field(default_factory=dict)  # CSV column -> TensorBoard tag
    # added to a logged step to make the CSV's: 1 for scripts that log at the 0-based index of the
    # step just done (the MuJoCo and DQN loops), 0 for those that log the count of steps (A2C)
    step_offset: int = 1

    @property
    def run_id(self) -> str:
        return f"{self.env.replace('/', '-')}__{self.variant}__{self.seed}"


def load_suite(path: str | Path, root: Path = ROOT) -> tuple[str, list[Run]]:
    """Read a suite file into its runs. `{env}` in `env_flags` and `{root}` anywhere in the flags are
    filled in (the repository's absolute path, so dataset paths work from any working directory)."""
    spec = tomllib.loads(Path(path).read_text())
    name = spec.get("name") or Path(path).stem
    missing = [k for k in ("envs", "seeds", "variants") if not spec.get(k)]
    if missing:
        raise SystemExit(f"error: suite {path} lacks {', '.join(missing)}; see benchmarks/suites/mujoco.toml")
    env_flags = spec.get("env_flags", "--env-id {env}")
    common = spec.get("flags", "")
    columns = dict(spec.get("columns", {}))
    step_offset = int(spec.get("step_offset", 1))
    runs = []
    for variant in spec["variants"]:
        if "name" not in variant or "script" not in variant:
            raise SystemExit(f"error: every [[variants]] entry of {path} needs a name and a script")
        if not (root / variant["script"]).is_file():
            raise SystemExit(f"error: suite {path}: variant {variant['name']} names {variant['script']}, not a file")
        envs = variant.get("envs", spec["envs"])
        seeds = variant.get("seeds", spec["seeds"])
        for env in envs:
            for seed in seeds:
                text = " ".join([env_flags.replace("{env}", env), common, variant.get("flags", "")])
                args = shlex.split(text.replace("{root}", str(root)))
                args += ["--seed", str(seed), "--exp-name", variant["name"]]
                cores = int(variant.get("cores", spec.get("cores_per_run", 1)))
                runs.append(
                    Run(name, env, variant["name"], int(seed), variant["script"], args, cores, columns, step_offset)
                )
    return name, runs


def read_events(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_event_times(run_dir: str | Path) -> list[float]:
    """The wall-clock times of every scalar logged in one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.wall_time for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def rows_from_events(scalars: dict, run: Run) -> list[dict]:
    """The CSV rows of one run: one per evaluation, with the normalised score where it was logged,
    and for each of the suite's columns the mean of its tag over the steps since the evaluation
    before (after the previous evaluation's step, up to this one's; empty if nothing was logged)."""
    norm = dict(scalars.get("eval/normalized_score", []))
    rows, previous = [], -1
    for step, value in scalars.get("eval/episodic_return", []):
        row = {
            "env_id": run.env,
            "variant": run.variant,
            "seed": run.seed,
            "step": step + run.step_offset,
            "eval_return": value,
        }
        if norm:
            row["normalized_score"] = norm.get(step, float("nan"))
        for column, tag in run.columns.items():
            window = [v for t, v in scalars.get(tag, []) if previous < t <= step]
            row[column] = sum(window) / len(window) if window else ""
        rows.append(row)
        previous = step
    return rows


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def machine_name() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"


def run_meta(run: Run, scalars: dict, commit: str, wall: float | None, peak_mb: float | None) -> dict:
    """The metadata line of one run. Paths under the repository are given relative to it (`{root}` of
    the suite file), so the command reproduces the run from any clone's root."""
    args = [a.replace(f"{ROOT}{os.sep}", "") for a in run.args]
    return {
        "run_id": run.run_id,
        "suite": run.suite,
        "script": run.script,
        "flags": args,
        "command": "python " + " ".join([run.script, *map(shlex.quote, args)]),
        "commit": commit,
        "wall_time_s": None if wall is None else round(wall, 1),
        "sps": scalars.get("charts/SPS", [(0, float("nan"))])[-1][1],
        "peak_memory_mb": None if peak_mb is None else round(peak_mb, 1),
        "threads": run.cores,
        "machine": machine_name(),
        "host": socket.gethostname(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def priority_setter(niceness: int | None):
    """A preexec_fn that gives the child process `niceness` where the OS allows (raising priority
    may need privileges: then the child keeps the worker's)."""

    def set_priority():
        if niceness is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except PermissionError:
                pass

    return set_priority


def execute(run: Run, root: str, workdir: str, niceness: int | None = None) -> dict:
    """Run one script to the end in `workdir` and return its CSV rows and metadata.

    `niceness`: the scheduling priority to run the script at. Ray starts its workers at nice 15,
    which starves a run whenever anything else is busy on the machine (a 400-step run took 250 s
    instead of 14 s beside two other jobs), so the driver passes its own priority down.
    Raises RuntimeError with the tail of the log if the script fails."""
    rundir = Path(workdir) / run.suite / run.run_id
    rundir.mkdir(parents=True, exist_ok=True)
    threads = str(run.cores)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.setdefault("MUJOCO_GL", "egl")
    # a run stopped part-way (a session's end, a job's time limit, Ctrl-C: every script checkpoints on
    # SIGTERM/SIGINT, and at --checkpoint-frequency) continues from its checkpoint with its own flags
    checkpoints = sorted((rundir / "runs").glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    resume = ["--resume", str(checkpoints[-1].relative_to(rundir))] if checkpoints else []
    # the scripts take a run's other flags from its checkpoint, but not --stop-at (one chunk's end is
    # not the next one's): a suite that ends its runs early with it passes it again on resume
    if resume and "--stop-at" in run.args:
        resume += run.args[run.args.index("--stop-at") : run.args.index("--stop-at") + 2]
    cmd = [sys.executable, str(Path(root) / run.script), *(resume or run.args)]
    start, commit = time.time(), git_commit(Path(root))  # the code the run starts with, not the one it ends at
    # one line per piece of the run (a first part, each resume), so a run finished on another machine
    # than the one it started on says where each part ran and for how long
    segment = {
        "host": socket.gethostname(),
        "machine": machine_name(),
        "resumed_from": resume[1] if resume else None,
        "commit": commit,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(rundir / "log.txt", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=rundir, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=priority_setter(niceness)
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone: its peak memory
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    segment.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(wall, 1), exit=proc.returncode)
    with open(rundir / "segments.jsonl", "a") as f:
        f.write(json.dumps(segment) + "\n")
    if proc.returncode != 0:
        tail = "".join((rundir / "log.txt").read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{run.run_id} exited with {proc.returncode}:\n{tail}")
    event_dirs = sorted((rundir / "runs").glob("*"), key=lambda p: p.stat().st_mtime)
    if not event_dirs:
        raise RuntimeError(f"{run.run_id}: the script wrote no runs/ folder")
    scalars = read_events(event_dirs[-1])
    if resume:  # the time spent before the stop counts too, the hours it sat stopped do not
        wall = active_seconds(read_event_times(event_dirs[-1]))
    meta = run_meta(run, scalars, commit, wall, usage.ru_maxrss / 1024)
    meta["resumed_from"] = resume[1] if resume else None
    meta["segments"] = [json.loads(line) for line in (rundir / "segments.jsonl").read_text().splitlines()]
    meta["commit"] = meta["segments"][0].get("commit", commit)  # a resumed run: the commit it began at
    return {"rows": rows_from_events(scalars, run), "meta": meta}


def write_result(result: dict, out_dir: Path) -> Path:
    """results/<suite>/<run_id>.csv and .json (a single line) from what `execute` returned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, rows = result["meta"], result["rows"]
    if not rows:
        raise RuntimeError(f"{meta['run_id']}: no eval/episodic_return was logged")
    path = out_dir / f"{meta['run_id']}.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{meta['run_id']}.json").write_text(json.dumps(meta) + "\n")
    os.replace(tmp, path)  # the CSV appears last: its presence means the run is complete
    return path


def active_seconds(times: list[float], max_gap: float = 600.0) -> float | None:
    """Wall time a run spent running: the sum of the gaps between its logged events, leaving out gaps
    over max_gap seconds (a run stopped, then resumed from its checkpoint in a later session)."""
    if not times:
        return None
    times = sorted(times)
    return sum(b - a for a, b in zip(times, times[1:]) if b - a <= max_gap)


def import_runs(folder: str | Path, runs: list[Run], out_dir: Path, commit: str) -> list[str]:
    """Results from runs made by hand: every TensorBoard folder `folder/runs/{env}__{variant}__{seed}__*`
    (the scripts' own run name, with `--exp-name VARIANT`) that matches a run of the suite and has no
    CSV yet. The metadata line says it was imported, with the suite's command for that run."""
    imported = []
    for run in runs:
        if (out_dir / f"{run.run_id}.csv").exists():
            continue
        matches = sorted(Path(folder).glob(f"runs/{run.env.replace('/', '-')}__{run.variant}__{run.seed}__*"))
        if not matches:
            continue
        scalars, times = read_events(matches[-1]), read_event_times(matches[-1])
        meta = run_meta(run, scalars, commit, active_seconds(times), None)
        meta["imported_from"] = matches[-1].name
        write_result({"rows": rows_from_events(scalars, run), "meta": meta}, out_dir)
        imported.append(run.run_id)
    return imported


def rewrite_results(workdir: str | Path, runs: list[Run], out_dir: Path) -> list[str]:
    """Make the CSVs of done runs again from their events in `workdir`, keeping their metadata."""
    rewritten = []
    for run in runs:
        path = out_dir / f"{run.run_id}.csv"
        event_dirs = sorted(
            (Path(workdir) / run.suite / run.run_id / "runs").glob("*"), key=lambda p: p.stat().st_mtime
        )
        if not path.exists() or not event_dirs:
            continue
        meta = json.loads((out_dir / f"{run.run_id}.json").read_text())
        write_result({"rows": rows_from_events(read_events(event_dirs[-1]), run), "meta": meta}, out_dir)
        rewritten.append(run.run_id)
    return rewritten


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="a suite file, e.g. benchmarks/suites/mujoco.toml")
    parser.add_argument("--results", default=str(ROOT / "results"), help="where results/<suite>/ goes")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "_runs"), help="runs' logs and events")
    parser.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto'); default local")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray only: cores to use (default all)")
    parser.add_argument("--only", default="", help="only runs whose id contains this text")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    parser.add_argument(
        "--import-from",
        default=None,
        help="take the results of runs made by hand (with --exp-name VARIANT) from FOLDER/runs/ instead of running",
    )
    parser.add_argument("--commit", default=None, help="with --import-from: the commit the runs were made at")
    parser.add_argument(
        "--rewrite", action="store_true", help="make the CSVs of done runs again from their events in --workdir"
    )
    opts = parser.parse_args(argv)

    suite, runs = load_suite(opts.suite)
    runs = [r for r in runs if opts.only in r.run_id]
    out_dir = Path(opts.results) / suite
    if opts.import_from:
        done = import_runs(opts.import_from, runs, out_dir, opts.commit or git_commit())
        print(f"imported {len(done)} runs into {out_dir}: {', '.join(done)}")
        return 0
    if opts.rewrite:
        done = rewrite_results(opts.workdir, runs, out_dir)
        print(f"rewrote {len(done)} CSVs in {out_dir} from {opts.workdir}: {', '.join(done)}")
        return 0
    todo = [r for r in runs if not (out_dir / f"{r.run_id}.csv").exists()]
    print(f"suite {suite}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run", flush=True)
    if opts.dry_run:
        for r in runs:
            state = "to run" if r in todo else "done"
            print(f"  {state:6s} {r.run_id}: python {r.script} {shlex.join(r.args)}  [{r.cores} core(s)]")
        return 0
    if not todo:
        return 0

    import ray

    if opts.address:
        excludes = ["results/", "runs/", "benchmarks/_runs/", ".git/", "site/", "*.hdf5"]
        ray.init(address=opts.address, runtime_env={"working_dir": str(ROOT), "excludes": excludes})
    else:
        ray.init(num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_retries=0)
    def task(run: Run, workdir: str, niceness: int) -> dict:
        # on a cluster the code is in the task's working directory; locally it is ROOT
        root = os.getcwd() if opts.address else str(ROOT)
        return execute(run, root, workdir, niceness)

    workdir = opts.workdir if not opts.address else "/tmp/entropy-rl-runs"
    niceness = os.getpriority(os.PRIO_PROCESS, 0)  # the runs get the driver's priority, not Ray's nice 15
    pending = {task.options(num_cpus=r.cores).remote(r, workdir, niceness): r for r in todo}
    capacity = int(ray.cluster_resources().get("CPU", 1))
    done, failed, start = 0, [], time.time()

    def progress(status: str = "") -> None:
        cores = max(r.cores for r in pending.values()) if pending else 1
        running = min(len(pending), max(1, capacity // cores))
        print(
            f"[{time.time() - start:7.0f}s] {status}done {done}, failed {len(failed)}, running {running}, "
            f"queued {len(pending) - running}, of {len(todo)}",
            flush=True,
        )

    progress()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=300)
        if not ready:  # a heartbeat every 5 minutes while long runs go on
            progress()
            continue
        run = pending.pop(ready[0])
        try:
            write_result(ray.get(ready[0]), out_dir)
            done += 1
            progress(f"finished {run.run_id} | ")
        except (ray.exceptions.RayTaskError, RuntimeError) as exc:
            failed.append(run.run_id)
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            print(f"--- {run.run_id} FAILED:\n{cause}\n---", flush=True)
            progress(f"FAILED {run.run_id} | ")
    print(f"suite {suite}: {done} done, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    print(f"results in {out_dir}; plot them with: python benchmarks/plot.py {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
