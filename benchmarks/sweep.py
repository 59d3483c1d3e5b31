"""Run a benchmark suite (script x flags x env x seed) as Ray tasks and keep each run's outcome as
plain files under results/<suite>/.

A suite is a TOML file (see benchmarks/suites/): which envs or datasets, which seeds, which
variants (a script and its flags), the flags every run shares, and how many cores one run takes.
Each run becomes one Ray task that reserves that many CPUs and runs the script with as many
torch/OMP threads, so a local `ray.init()` runs one single-core run per core.

The scripts run from a frozen commit with `--at REF` (a git worktree under --workdir, reused
across invocations); without it a working tree whose tracked files differ from HEAD is refused
unless --allow-dirty. SIGTERM, Ctrl-C or an --hours budget make every running run checkpoint and
exit; the same command again skips finished runs, resumes checkpointed ones and starts the rest.

For each finished run the driver writes
    results/<suite>/<env>__<variant>__<seed>.csv    env_id, variant, seed, step, eval_return
                                                    (+ normalized_score when the script logs it,
                                                    + the suite's [columns]: the mean of a logged
                                                    tag since the evaluation before, e.g. the
                                                    training return or the policy's entropy)
    results/<suite>/<env>__<variant>__<seed>.json   the run's record, as `execute` wrote it
the CSV from the run's TensorBoard events. `--rewrite` makes the CSVs of done runs again from their
events in --workdir, for columns added to a suite after its runs. A run that fails is reported
with the tail of its log while the others go on.

    pip install -r benchmarks/requirements.txt
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml --dry-run        # list the runs
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml --at HEAD        # local, one run per core
    python benchmarks/sweep.py benchmarks/suites/mujoco.toml --at HEAD --address auto   # a Ray cluster
    python benchmarks/plot.py results/mujoco                                  # curves and tables

On a cluster (`--address`), the code is shipped to the workers as Ray's working_dir, and only the
CSV rows and records travel back: the TensorBoard events stay on the worker.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import signal
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
                offset = int(variant.get("step_offset", step_offset))
                runs.append(Run(name, env, variant["name"], int(seed), variant["script"], args, cores, columns, offset))
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


def git(root: Path, *args: str) -> str:
    """The output of a git command in `root`, or "" where `root` is not a git checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit(root: Path = ROOT) -> str:
    """The short commit of `root`, with "+dirty" where its Python files differ from it."""
    commit = git(root, "rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if git(root, "status", "--porcelain", "--", "*.py") else "") if commit else "unknown"


def code_state(root: Path) -> dict:
    """Which code a run runs: the full commit of `root`, whether its tracked files differ from it
    (results/ aside), and the sha256 of that difference, so a dirty run's code can be told apart."""
    diff = git(root, "diff", "HEAD", "--", ".", ":(exclude)results")
    return {
        "commit": git(root, "rev-parse", "HEAD") or None,
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


PACKAGES = ("torch", "gymnasium", "mujoco", "dm_control", "ale_py", "numpy")


def versions() -> dict:
    """The versions of Python and the packages a run's numbers depend on, in this interpreter."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_hashes(args: list[str], cwd: Path) -> dict:
    """{path: sha256} of every file a run's flags name (a --dataset file, say), as the run reads it."""
    files = {}
    for a in args:
        path = Path(a) if os.path.isabs(a) else cwd / a
        if a and not a.startswith("-") and path.is_file():
            files[a.replace(f"{ROOT}{os.sep}", "")] = sha256_file(path)
    return files


def machine_name() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"


def run_meta(run: Run, scalars: dict, commit: str, wall: float | None, peak_mb: float | None) -> dict:
    """The metadata line of an imported run (see `import_runs`): what the suite says of it and what its
    events show. Paths under the repository are given relative to it (`{root}` of the suite file), so
    the command reproduces the run from any clone's root."""
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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def child_setup(niceness: int | None):
    """A preexec_fn for a run's process: `niceness` where the OS allows (raising priority may need
    privileges: then it keeps the worker's), and on Linux a SIGTERM if the worker that waits on it
    dies, so that a run never goes on unwatched: it checkpoints and stops as on a job's time limit."""

    def setup():
        if niceness is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except PermissionError:
                pass
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)  # a script's exit after checkpointing on a signal


def execute(run: Run, root: str, workdir: str, niceness: int | None = None, code: dict | None = None) -> dict:
    """Run one script in `workdir` until it ends or is stopped, and return its CSV rows and record.

    The record (`record.json` beside the run's log, one line) is written here, by the process that
    starts and waits on the script, after every segment of the run (a first part, each resume): the
    script and its argv, the code (`code_state` of `root`, or `code` where `root` is not a git
    checkout, as on a Ray cluster), package versions, the sha256 of each file its flags name, and per
    segment the host, start, end, wall time, exit status, peak memory and steps. The committed JSON is
    this file as it stands when the run ends.

    A script stopped by SIGTERM (sent by the driver, or here on Ctrl-C / Ray's cancel) checkpoints and
    exits; the call then returns {"stopped": ...} and the next call resumes from the checkpoint.
    `niceness`: the scheduling priority to run the script at (Ray starts its workers at nice 15).
    Raises RuntimeError with the tail of the log if the script fails."""
    rundir = Path(workdir) / run.suite / run.run_id
    rundir.mkdir(parents=True, exist_ok=True)
    threads = str(run.cores)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.setdefault("MUJOCO_GL", "egl")
    # a run stopped part-way continues from its latest checkpoint with its own flags
    checkpoints = sorted((rundir / "runs").glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    resume = ["--resume", str(checkpoints[-1].relative_to(rundir))] if checkpoints else []
    # the scripts take a run's other flags from its checkpoint, but not --stop-at (one chunk's end is
    # not the next one's): a suite that ends its runs early with it passes it again on resume
    if resume and "--stop-at" in run.args:
        resume += run.args[run.args.index("--stop-at") : run.args.index("--stop-at") + 2]
    argv = [Path(sys.executable).name, run.script, *(resume or run.args)]
    record_path = rundir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    state = code_state(Path(root)) if git(Path(root), "rev-parse", "HEAD") else dict(code or {})
    if record is None:
        args = [a.replace(f"{ROOT}{os.sep}", "") for a in run.args]
        record = {
            "run_id": run.run_id,
            "suite": run.suite,
            "runner": "benchmarks/sweep.py",
            "script": run.script,
            "flags": args,
            "command": "python " + " ".join([run.script, *map(shlex.quote, args)]),
            "argv": argv,
            **state,
            "versions": versions(),
            "datasets": dataset_hashes(run.args, Path(root)),
            "threads": run.cores,
            "segments": [],
        }
    segment = {
        "host": socket.gethostname(),
        "machine": machine_name(),
        "argv": argv,
        **{k: state.get(k) for k in ("commit", "dirty", "diff_sha256")},
        "versions": versions(),
        "started": now(),
    }
    start = time.time()
    with open(rundir / "log.txt", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(root) / run.script), *argv[2:]],
            cwd=rundir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=child_setup(niceness),
            start_new_session=True,  # a Ctrl-C at the terminal reaches the driver, which stops the runs
        )
        (rundir / "pid").write_text(str(proc.pid))
        while True:
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child: its peak memory
                break
            except KeyboardInterrupt:  # Ray's cancel, or a Ctrl-C that reached this worker
                proc.send_signal(signal.SIGTERM)
        (rundir / "pid").unlink(missing_ok=True)
    exit_code = os.waitstatus_to_exitcode(status)
    event_dirs = sorted((rundir / "runs").glob("*"), key=lambda p: p.stat().st_mtime)
    scalars = read_events(event_dirs[-1]) if event_dirs else {}
    steps = max((s for values in scalars.values() for s, _ in values), default=-1) + run.step_offset
    segment.update(
        resumed_from=resume[1] if resume else None,
        ended=now(),
        wall_s=round(time.time() - start, 1),
        exit=exit_code,
        peak_memory_mb=round(usage.ru_maxrss / 1024, 1),
        steps=steps,
    )
    record["segments"].append(segment)
    walls = [s["wall_s"] for s in record["segments"]]
    record.update(
        wall_time_s=round(sum(walls), 1),
        peak_memory_mb=max(s["peak_memory_mb"] for s in record["segments"]),
        sps=scalars.get("charts/SPS", [(0, None)])[-1][1],
        steps=steps,
        steps_per_wall_second=round(steps / sum(walls), 2) if steps > 0 and sum(walls) > 0 else None,
        host=segment["host"],
        machine=segment["machine"],
        finished=segment["ended"] if exit_code == 0 else None,
        imported=False,
    )
    if (rundir / "peer.json").exists():  # a harness running a peer's code says which, and what it changed
        record["peer"] = json.loads((rundir / "peer.json").read_text())
    record_path.write_text(json.dumps(record) + "\n")
    if exit_code in STOPPED:
        return {"stopped": True, "run_id": run.run_id, "steps": steps, "checkpointed": bool(event_dirs)}
    if exit_code != 0:
        tail = "".join((rundir / "log.txt").read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{run.run_id} exited with {exit_code}:\n{tail}")
    if not event_dirs:
        raise RuntimeError(f"{run.run_id}: the script wrote no runs/ folder")
    return {"rows": rows_from_events(scalars, run), "meta": record, "record_text": record_path.read_text()}


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
    # a run's own record as its process wrote it; an imported run's line as `import_runs` made it
    (out_dir / f"{meta['run_id']}.json").write_text(result.get("record_text") or json.dumps(meta) + "\n")
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
        # what the driver could not see: the commit is as typed, machine, host and times are the import's
        meta.update(imported=True, typed={"commit": commit})
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


def worktree(ref: str, workdir: Path) -> Path:
    """A git worktree of commit `ref` under `workdir`, made once and reused: runs started from it keep
    running the code of that commit whatever happens to the working tree meanwhile."""
    commit = git(ROOT, "rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"error: --at {ref}: not a commit of {ROOT}; give a branch, tag or commit hash")
    path = workdir / "trees" / commit[:12]
    if not (path / ".git").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)
        made = subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, capture_output=True)
        if made.returncode != 0:
            raise SystemExit(f"error: git worktree add {path} failed: {made.stderr.decode().strip()}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="a suite file, e.g. benchmarks/suites/mujoco.toml")
    parser.add_argument("--results", default=str(ROOT / "results"), help="where results/<suite>/ goes")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "_runs"), help="runs' logs and events")
    parser.add_argument(
        "--at", default=None, help="run the scripts of this commit (a worktree under --workdir), not the working tree"
    )
    parser.add_argument(
        "--allow-dirty", action="store_true", help="without --at: run even if tracked files differ from HEAD"
    )
    parser.add_argument("--hours", type=float, default=None, help="stop (checkpointing every run) after this long")
    parser.add_argument("--nice", type=int, default=10, help="run the scripts this much below the driver's priority")
    parser.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto'); default local")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray only: cores (lanes) to use (default all)")
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
    if opts.at:
        code_root = worktree(opts.at, Path(opts.workdir).resolve())
    else:
        code_root = ROOT
        changed = git(ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        if changed and not opts.allow_dirty:
            raise SystemExit(
                "error: tracked files differ from HEAD; commit them, run a commit with --at REF, "
                "or pass --allow-dirty (the records will say dirty)"
            )
    for r in todo:
        if not (code_root / r.script).is_file():
            raise SystemExit(f"error: {r.script} is not in {code_root}; --at a commit that has it")
    code = code_state(code_root)
    print(f"code: {code_root} at {code['commit']}{' (dirty)' if code['dirty'] else ''}", flush=True)

    import ray

    if opts.address:
        excludes = ["results/", "runs/", "benchmarks/_runs/", ".git/", "site/", "*.hdf5"]
        ray.init(address=opts.address, runtime_env={"working_dir": str(code_root), "excludes": excludes})
    else:
        ray.init(num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_retries=0)
    def task(run: Run, workdir: str, niceness: int, code: dict) -> dict:
        # on a cluster the code is in the task's working directory; locally it is code_root
        root = os.getcwd() if opts.address else str(code_root)
        return execute(run, root, workdir, niceness, code)

    workdir = opts.workdir if not opts.address else "/tmp/entropy-rl-runs"
    niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + opts.nice)
    pending = {task.options(num_cpus=r.cores).remote(r, workdir, niceness, code): r for r in todo}
    capacity = int(ray.cluster_resources().get("CPU", 1))
    done, failed, stopped, start = 0, [], [], time.time()
    stop_requested = []  # a signal's name, or "--hours"
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, frame: stop_requested.append(signal.Signals(sig).name))

    def progress(status: str = "") -> None:
        cores = max(r.cores for r in pending.values()) if pending else 1
        running = min(len(pending), max(1, capacity // cores))
        print(
            f"[{time.time() - start:7.0f}s] {status}done {done}, failed {len(failed)}, running {running}, "
            f"queued {len(pending) - running}, of {len(todo)}",
            flush=True,
        )

    def stop_all() -> None:
        """Checkpoint and stop every running run; drop the queued ones (the same command starts them)."""
        for ref, run in pending.items():
            pid_file = Path(workdir) / run.suite / run.run_id / "pid"
            if not opts.address and pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
            else:  # queued, or on a cluster: Ray's cancel reaches execute() as a KeyboardInterrupt
                ray.cancel(ref, force=False)

    progress()
    last_beat, stopping = time.time(), False
    while pending:
        if opts.hours is not None and time.time() - start > opts.hours * 3600 and not stop_requested:
            stop_requested.append("--hours")
        if stop_requested and not stopping:
            stopping = True
            print(f"stopping ({stop_requested[0]}): every running run checkpoints", flush=True)
            stop_all()
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2)
        if not ready:
            if time.time() - last_beat > 300:  # a heartbeat every 5 minutes while long runs go on
                progress()
                last_beat = time.time()
            continue
        run = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
            if result.get("stopped"):
                stopped.append(run.run_id)
                progress(f"stopped {run.run_id} at step {result['steps']} | ")
                continue
            write_result(result, out_dir)
            done += 1
            progress(f"finished {run.run_id} | ")
        except ray.exceptions.TaskCancelledError:
            pass  # queued when the stop came: not started
        except (ray.exceptions.RayTaskError, RuntimeError) as exc:
            failed.append(run.run_id)
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            print(f"--- {run.run_id} FAILED:\n{cause}\n---", flush=True)
            progress(f"FAILED {run.run_id} | ")
    print(f"suite {suite}: {done} done, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    if stop_requested:
        print(f"stopped by {stop_requested[0]}: {len(stopped)} runs checkpointed; the same command resumes them")
    print(f"results in {out_dir}; plot them with: python benchmarks/plot.py {out_dir}")
    return 1 if failed else (3 if stop_requested else 0)


if __name__ == "__main__":
    sys.exit(main())
