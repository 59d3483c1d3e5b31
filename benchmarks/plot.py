"""Learning curves and a results table from the per-run CSVs that benchmarks/sweep.py writes.

    python benchmarks/plot.py results/mujoco

writes into that folder:
    curves.png   one panel per env: the mean evaluation return over seeds at each evaluation, one
                 colour per variant, with a band that the legend names: the range over seeds
                 (lowest to highest) when a variant has fewer than 5 seeds, else the 95% bootstrap
                 interval of the mean; when the CSVs carry `train_return` (the Atari suites), a
                 second row of panels with the training games' return
    results.md   per env and variant: seeds, final return, area under the curve and the final
                 return of each seed; the interquartile mean (IQM) of the final normalised score
                 with rliable's stratified-bootstrap interval, for every variant with at least 5
                 runs across the suite's envs; the suite's own [columns] (value estimates beside
                 the returns they estimate, ...) at the last evaluation; with --compare A B
                 (repeatable), the difference B - A of the final return and the AUC per env; when
                 the folder has paper.json, a paper's table beside ours (see paper_rows); and the
                 command that made it, so that it can be made again

Intervals say what they are. With fewer than 5 seeds a percentile bootstrap of the mean cannot
give more than the seeds' own range (with 3 seeds it gives exactly [lowest, highest]), so such
cells show the mean and the range, written "mean (lowest to highest)"; from 5 seeds on they show
the 95% percentile-bootstrap interval of the mean, written "mean [low, high]". A difference of two
variants with fewer than 5 seeds a side shows the range over all pairs of seeds. Every bootstrap
is seeded, so the same CSVs give the same results.md byte for byte.

On Atari panels a dashed line marks the uniform-random policy's score (Mnih et al. 2015's table),
so that a curve which never leaves it is visible as such; steps there are agent steps of 4 frames.

"Final return" is the last evaluation. "Area under the curve" is the mean of the evaluation
returns over all evaluations, so it rewards learning early, and its unit is a return. The score
that the IQM aggregates is the D4RL-normalised score: logged by the offline script, and computed
here with D4RL's reference returns for the Gym locomotion robots; an env without reference
returns is left out of the IQM.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

# D4RL's reference returns (random, expert) for the normalised score 100*(R - random)/(expert - random)
D4RL_REF = {
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
    "Walker2d": (1.629008, 4592.3),
    "Ant": (-325.6, 3879.7),
}

# the random policy's score per game (Mnih et al. 2015, Extended Data Table 2)
ROOT = Path(__file__).resolve().parent.parent

ATARI_RANDOM = {"Breakout": 1.7, "Pong": -20.7, "Seaquest": 68.4, "SpaceInvaders": 148.0, "BeamRider": 363.9}


def atari_random(env: str) -> float | None:
    """The random policy's score for an ALE env id such as BreakoutNoFrameskip-v4 or ALE/Pong-v5."""
    game = env.split("/")[-1].split("NoFrameskip")[0].split("-v")[0]
    return ATARI_RANDOM.get(game)


BASE_COLUMNS = {"env_id", "variant", "seed", "step", "eval_return", "normalized_score", "train_return"}


def load_runs(folder: str | Path) -> dict:
    """{(env, variant, seed): {"step": array, "eval_return": array, "normalized_score": array or None,
    "train_return": array or None, "diagnostics": {column: array}}}: the training games' mean return
    since the evaluation before, and the suite's own [columns] (value estimates, data returns, ...)"""
    runs = {}
    for path in sorted(Path(folder).glob("*.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows or "eval_return" not in rows[0]:
            continue
        key = (rows[0]["env_id"], rows[0]["variant"], int(rows[0]["seed"]))
        norm = [float(r["normalized_score"]) for r in rows] if "normalized_score" in rows[0] else None
        train = [float(r["train_return"] or "nan") for r in rows] if "train_return" in rows[0] else None
        runs[key] = {
            "step": np.array([int(r["step"]) for r in rows]),
            "eval_return": np.array([float(r["eval_return"]) for r in rows]),
            "normalized_score": None if norm is None else np.array(norm),
            "train_return": None if train is None else np.array(train),
            "diagnostics": {c: np.array([float(r[c] or "nan") for r in rows]) for c in rows[0] if c not in BASE_COLUMNS},
        }
    return runs


MIN_BOOTSTRAP_SEEDS = 5  # below this, a cell shows the seeds' range instead of a bootstrap interval


def summary(values) -> tuple[float, float, float, str]:
    """(mean, low, high, kind) of per-seed values: kind "ci" is the 95% bootstrap interval of the mean
    (MIN_BOOTSTRAP_SEEDS seeds or more), kind "range" the lowest and highest seed."""
    values = np.asarray(values, dtype=float)
    if len(values) >= MIN_BOOTSTRAP_SEEDS:
        return (*bootstrap_ci(values), "ci")
    return float(values.mean()), float(values.min()), float(values.max()), "range"


def diff_summary(a, b) -> tuple[float, float, float, str]:
    """mean(b) - mean(a) with the bootstrap interval (MIN_BOOTSTRAP_SEEDS seeds a side or more), else
    the range over all pairs of seeds, [min(b) - max(a), max(b) - min(a)]."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) >= MIN_BOOTSTRAP_SEEDS:
        return (*bootstrap_diff_ci(a, b), "ci")
    return float(b.mean() - a.mean()), float(b.min() - a.max()), float(b.max() - a.min()), "range"


def bootstrap_ci(values, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and the 95% percentile-bootstrap interval of the mean of `values` (seeds as samples).
    With one value the interval is that value."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(1)
    return mean, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def aligned(runs: dict, env: str, variant: str, key: str = "eval_return"):
    """(steps, matrix seeds x evaluations) on the evaluation steps that every seed has."""
    curves = {s: r for (e, v, s), r in sorted(runs.items(), key=lambda kv: kv[0][2]) if e == env and v == variant}
    steps = sorted(set.intersection(*(set(r["step"].tolist()) for r in curves.values())))
    values = {s: r[key] if key in r else r["diagnostics"][key] for s, r in curves.items()}
    matrix = np.array([[dict(zip(curves[s]["step"].tolist(), values[s]))[t] for t in steps] for s in curves])
    return np.array(steps), matrix


def normalized_final(run: dict, env: str) -> float | None:
    if run["normalized_score"] is not None:
        return float(run["normalized_score"][-1])
    robot = next((name for name in D4RL_REF if env.startswith(name)), None)
    if robot is None:
        return None
    low, high = D4RL_REF[robot]
    return 100.0 * (float(run["eval_return"][-1]) - low) / (high - low)


def panel_xlabel(env: str) -> str:
    return "agent steps (4 frames each)" if atari_random(env) is not None else "steps"


def bootstrap_diff_ci(a, b, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its 95% percentile-bootstrap interval, resampling the seeds of each
    side independently (the runs of two variants are not paired)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = b[rng.integers(0, len(b), (reps, len(b)))].mean(1) - a[rng.integers(0, len(a), (reps, len(a)))].mean(1)
    return float(b.mean() - a.mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def compare_rows(runs: dict, envs: list[str], a: str, b: str) -> list[str]:
    """Per env with both variants: b - a of the final return and of the AUC, on the steps both have;
    and of the training return (its last window, its mean) when the runs carry it."""
    lines = []
    has_train = all(r["train_return"] is not None for r in runs.values())
    for env in envs:
        if not all(any(e == env and v == x for e, v, _ in runs) for x in (a, b)):
            continue
        (steps_a, ma), (steps_b, mb) = aligned(runs, env, a), aligned(runs, env, b)
        common = sorted(set(steps_a.tolist()) & set(steps_b.tolist()))
        if not common:
            continue
        ma = ma[:, [steps_a.tolist().index(t) for t in common]]
        mb = mb[:, [steps_b.tolist().index(t) for t in common]]
        final = diff_summary(ma[:, -1], mb[:, -1])
        auc = diff_summary(ma.mean(1), mb.mean(1))
        row = f"| {env} | {len(ma)} / {len(mb)} | {common[-1]} | {fmt(*final)} | {fmt(*auc)} |"
        if has_train:
            (_, ta), (_, tb) = aligned(runs, env, a, "train_return"), aligned(runs, env, b, "train_return")
            ta = ta[:, [steps_a.tolist().index(t) for t in common]]
            tb = tb[:, [steps_b.tolist().index(t) for t in common]]
            row += f" {fmt(*diff_summary(ta[:, -1], tb[:, -1]))} | {fmt(*diff_summary(ta.mean(1), tb.mean(1)))} |"
        lines.append(row)
    if lines:
        lines = [
            "",
            f"{b} - {a}: the difference of the means over seeds; (x to y): the range over all pairs of seeds "
            f"(fewer than {MIN_BOOTSTRAP_SEEDS} seeds a side); [x, y]: 95% bootstrap interval, seeds resampled per variant:",
            "",
            f"| env | seeds {a} / {b} | last step | final return | AUC |"
            + (" training return, last window | training return, mean |" if has_train else ""),
            "| --- | --- | --- | --- | --- |" + (" --- | --- |" if has_train else ""),
            *lines,
        ]
    return lines


def fmt(mean: float, lo: float, hi: float, kind: str = "ci", spec: str = ".1f") -> str:
    """ "mean [low, high]" for a bootstrap interval, "mean (lowest to highest)" for a range over seeds."""
    if lo == hi:
        return f"{mean:{spec}}"
    if kind == "range":
        return f"{mean:{spec}} ({lo:{spec}} to {hi:{spec}})"
    return f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def iqm_rows(runs: dict, envs: list[str], variants: list[str]) -> list[str]:
    """IQM of the final normalised score with rliable's stratified bootstrap CI, per variant with
    at least 5 runs across the envs that have a normalised score."""
    lines = []
    for variant in variants:
        per_env = defaultdict(list)
        for (env, v, _), run in runs.items():
            score = normalized_final(run, env) if v == variant else None
            if score is not None:
                per_env[env].append(score)
        if not per_env:
            continue
        n = min(len(s) for s in per_env.values())  # rliable wants runs x tasks
        if n * len(per_env) < 5:
            continue
        from rliable import library as rly
        from rliable import metrics

        matrix = np.array([per_env[env][:n] for env in sorted(per_env)]).T
        state = np.random.get_state()
        np.random.seed(0)  # rliable resamples with NumPy's global generator: seeded, the same CSVs give the same table
        point, interval = rly.get_interval_estimates(
            {variant: matrix}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=2000
        )
        np.random.set_state(state)
        lo, hi = interval[variant][:, 0]
        ci = f"[{lo:.1f}, {hi:.1f}]" if n >= MIN_BOOTSTRAP_SEEDS else f"none: {n} seeds an env"
        lines.append(f"| {variant} | {n} x {len(per_env)} | {point[variant][0]:.1f} | {ci} |")
    if lines:
        lines = [
            "",
            "IQM of the final normalised score (rliable), with its 95% stratified bootstrap interval where every "
            f"env has at least {MIN_BOOTSTRAP_SEEDS} seeds:",
            "",
            "| variant | runs x envs | IQM | 95% CI |",
            "| --- | --- | --- | --- |",
            *lines,
        ]
    return lines


def diagnostic_rows(runs: dict, envs: list[str], variants: list[str]) -> list[str]:
    """Per env and variant, the suite's own columns (value estimates beside the returns they
    estimate, ...) at the last evaluation that every seed has: the mean over seeds (range)."""
    columns = list(dict.fromkeys(c for r in runs.values() for c in r["diagnostics"]))
    if not columns:
        return []
    lines = []
    for env in envs:
        for variant in variants:
            keys = [k for k in runs if k[:2] == (env, variant)]
            if not keys:
                continue
            steps, _ = aligned(runs, env, variant)
            cells = []
            for column in columns:
                final = None
                if all(column in runs[k]["diagnostics"] for k in keys):  # runs made before a column was added lack it
                    final = aligned(runs, env, variant, column)[1][:, -1]
                if final is None or not np.isfinite(final).all():
                    cells.append("–")
                    continue
                spec = ".1f" if np.abs(final).max() >= 10 else ".3f"  # fractions and small values keep 3 decimals
                cells.append(fmt(*summary(final), spec=spec))
            if any(c != "–" for c in cells):
                lines.append(f"| {env} | {variant} | {len(keys)} | {steps[-1]} | " + " | ".join(cells) + " |")
    if lines:
        lines = [
            "",
            "The suite's diagnostics at the last evaluation (mean over seeds, then the range), each the mean of "
            "its logged tag since the evaluation before:",
            "",
            "| env | variant | seeds | step | " + " | ".join(columns) + " |",
            "| --- | --- | --- | --- |" + " --- |" * len(columns),
            *lines,
        ]
    return lines


def paper_rows(folder: Path, runs: dict, envs: list[str]) -> list[str]:
    """Our final scores beside a paper's table, when the folder has paper.json: {"source": ...,
    "metric": "normalized_score" or "eval_return", "columns": [[our variant, the paper's column], ...],
    "scores": {env: {the paper's column: value}}}; with the data's own normalised level per env when
    the folder has the datasets.json that tools/make_d4rl_datasets.py writes."""
    if not (folder / "paper.json").exists():
        return []
    paper = json.loads((folder / "paper.json").read_text())
    if paper["metric"] == "normalized_score" and any(r["normalized_score"] is None for r in runs.values()):
        raise SystemExit(f"error: {folder}/paper.json compares normalized_score, which some CSVs lack; use eval_return")
    levels = {}
    if (folder / "datasets.json").exists():
        for robot in json.loads((folder / "datasets.json").read_text()).values():
            levels.update({name: d["normalised_mean"] for name, d in robot["datasets"].items()})
    header = "| env |" + (" data level |" if levels else "")
    for ours, theirs in paper["columns"]:
        header += f" {ours} | {theirs}, paper |"
    lines = ["", f"Beside {paper['source']}:", "", header, "| --- |" + " --- |" * (header.count("|") - 2)]
    for env in paper["scores"]:
        row = f"| {env} |" + (f" {levels.get(env, '–')} |" if levels else "")
        for ours, theirs in paper["columns"]:
            if any(k[:2] == (env, ours) for k in runs) and env in envs:
                _, matrix = aligned(runs, env, ours, paper["metric"])
                row += f" {fmt(*summary(matrix[:, -1]))} ({len(matrix)}) |"
            else:
                row += " – |"
            row += f" {paper['scores'][env].get(theirs, '–')} |"
        lines.append(row)
    return lines + ["", "Ours: the mean over seeds of the final evaluation, (lowest to highest), (number of seeds)."]


def script_blob(commit: str, script: str) -> str | None:
    """The git object of `script` at `commit` in this clone: equal for two commits whose script is the
    same file; None where the commit is unknown here (a typo, a "+dirty" tree, a history rewritten)."""
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", f"{commit}:{script}"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or None


def changed_lines(a: str, b: str, script: str) -> int:
    """Lines added plus lines removed in `script` from commit a to commit b."""
    out = subprocess.run(["git", "diff", "--numstat", a, b, "--", script], cwd=ROOT, capture_output=True, text=True)
    return sum(int(x) for line in out.stdout.splitlines() for x in line.split()[:2] if x.isdigit())


def run_commits(record: dict) -> list[tuple[str, bool]]:
    """The commits a run's steps came from, as (commit, dirty): those of its segments from its last
    fresh start (a start that did not resume: what ran before it was thrown away) in order, one where
    a resume changed commit; the record's own commit where its segments do not name theirs."""
    segments = record.get("segments") or []
    fresh = [i for i, s in enumerate(segments) if not s.get("resumed_from")]
    kept = segments[fresh[-1] :] if fresh else []
    if not kept or not all(s.get("commit") for s in kept):
        return [(str(record.get("commit") or "unknown"), bool(record.get("dirty")))]
    return list(dict.fromkeys((str(s["commit"]), bool(s.get("dirty"))) for s in kept))


def provenance_rows(folder: Path) -> list[str]:
    """Where the runs came from, from their records: per commit, the runs, how they were made (by the
    runner, or imported with the commit as typed), and the package versions they recorded; and a
    warning where runs of one script come from commits whose copies of that script differ."""
    groups, blobs = defaultdict(list), defaultdict(dict)
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "run_id" not in record:
            continue
        made = "imported" if record.get("imported") else "runner"
        versions = record.get("versions") or {}
        versions = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "not recorded"
        script = record.get("script", "?")
        shorts = []
        for commit, dirty in run_commits(record):
            short = commit[:7] + ("+dirty" if dirty or commit.endswith("+dirty") else "")
            shorts.append(short)
            if made != "imported" or "imported_from" in record:
                comparable = " " not in script and not short.endswith("+dirty")
                blobs[script][short] = script_blob(commit, script) if comparable else None
        groups[(" then ".join(shorts), made, versions)].append(record["run_id"])
    if not groups:
        return []
    rows = ["", "## Provenance", "", "From each run's record (its .json beside the CSV).", ""]
    rows += ["| commit | made by | runs | versions |", "| --- | --- | --- | --- |"]
    for (short, made, versions), ids in sorted(groups.items()):
        rows.append(f"| {short} | {made} | {len(ids)} | {versions} |")
    for script, by_commit in sorted(blobs.items()):
        known = {b for b in by_commit.values() if b}
        unknown = sorted(c for c, b in by_commit.items() if not b)
        if len(known) > 1:
            commits = sorted(c for c, b in by_commit.items() if b)
            changed = [changed_lines(commits[0], c, script) for c in commits[1:]]
            rows.append(
                f"\n**Mixed code:** the runs of {script} come from {len(known)} different versions of it "
                f"(commits {', '.join(commits)}; lines changed from {commits[0]}: {', '.join(map(str, changed))})."
            )
        if unknown and len(by_commit) > 1:
            rows.append(f"\nThe {script} of {', '.join(unknown)} cannot be compared: not a commit of this clone, or dirty.")
    return rows


def plot_band(ax, steps, matrix, colour, variant: str) -> None:
    """The mean over seeds (rows of `matrix`) and a band that the legend names: the range over seeds
    below MIN_BOOTSTRAP_SEEDS seeds, else the 95% bootstrap interval of the mean."""
    stats = np.array([summary(matrix[:, j])[:3] for j in range(matrix.shape[1])])
    n = len(matrix)
    band = "" if n == 1 else ", band: range of seeds" if n < MIN_BOOTSTRAP_SEEDS else ", band: 95% bootstrap CI"
    ax.plot(steps, stats[:, 0], color=colour, label=f"{variant} ({n} seed{'s' if n > 1 else ''}{band})")
    if n > 1:
        ax.fill_between(steps, stats[:, 1], stats[:, 2], color=colour, alpha=0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a results/<suite> folder of per-run CSVs")
    parser.add_argument("--title", default=None, help="figure title (default: the folder's name)")
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        default=[],
        help="also tabulate variant B minus variant A per env; give it once per pair to keep several tables",
    )
    opts = parser.parse_args(argv)
    folder = Path(opts.folder)
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"error: no run CSVs in {folder}; run benchmarks/sweep.py first")
    envs = sorted({e for e, _, _ in runs})
    variants = list(dict.fromkeys(v for _, v, _ in sorted(runs, key=lambda k: k[1])))
    for pair in opts.compare:
        missing = [v for v in pair if v not in variants]
        if missing:
            raise SystemExit(f"error: --compare: no runs of {missing} in {folder}; its variants are {variants}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = all(r.get("train_return") is not None for r in runs.values())  # Atari: the training games too
    cols = min(len(envs), 3)
    rows_ = math.ceil(len(envs) / cols) * (2 if trained else 1)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4 * rows_), squeeze=False)
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    scored = all(r["normalized_score"] is not None for r in runs.values())  # offline: D4RL-style scores too
    command = " ".join(["python benchmarks/plot.py", opts.folder] + [f"--compare {a} {b}" for a, b in opts.compare])
    table = [
        f"# Results: {folder.name}",
        "",
        f"Made by `{command}` from the per-run CSVs in this folder.",
        "",
        f"Mean over seeds, then (lowest to highest seed) for cells of fewer than {MIN_BOOTSTRAP_SEEDS} seeds, or "
        "[95% bootstrap interval of the mean] for more. Final: the last evaluation. AUC: the mean of all "
        "evaluations."
        + (" Score: the final normalised score, 100 (R - R_random) / (R_expert - R_random)." if scored else ""),
        "",
        "| env | variant | seeds | last step | final return | AUC |"
        + (" final score |" if scored else "")
        + " final return per seed |",
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if scored else "") + " --- |",
    ]
    for ax, env in zip(axes.flat, envs):
        for variant in variants:
            if not any(e == env and v == variant for e, v, _ in runs):
                continue
            steps, matrix = aligned(runs, env, variant)
            plot_band(ax, steps, matrix, colours[variant], variant)
            final, auc = summary(matrix[:, -1]), summary(matrix.mean(1))
            row = f"| {env} | {variant} | {len(matrix)} | {steps[-1]} | {fmt(*final)} | {fmt(*auc)} |"
            if scored:
                row += f" {fmt(*summary(aligned(runs, env, variant, 'normalized_score')[1][:, -1]))} |"
            table.append(row + " " + " / ".join(f"{x:.1f}" for x in matrix[:, -1]) + " |")
        random_score = atari_random(env)
        if random_score is not None:
            ax.axhline(random_score, color="grey", linestyle="--", linewidth=1, label=f"random policy ({random_score})")
        ax.set_title(env)
        ax.set_xlabel(panel_xlabel(env))
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if trained:  # the second half of the panels: the training games' return, many more games than the evaluations
        for ax, env in zip(list(axes.flat)[len(axes.flat) // 2 :], envs):
            for variant in variants:
                if not any(e == env and v == variant for e, v, _ in runs):
                    continue
                steps, matrix = aligned(runs, env, variant, "train_return")
                plot_band(ax, steps, matrix, colours[variant], variant)
            ax.set_title(f"{env}: training games")
            ax.set_xlabel(panel_xlabel(env))
            ax.set_ylabel("training return (mean since the evaluation before)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    used = len(envs) if not trained else None
    for i, ax in enumerate(axes.flat):
        half = len(axes.flat) // 2
        if (used is not None and i >= used) or (used is None and (i % half) >= len(envs)):
            ax.axis("off")
    fig.suptitle(opts.title or folder.name)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)
    table += iqm_rows(runs, envs, variants)
    table += diagnostic_rows(runs, envs, variants)
    table += paper_rows(folder, runs, envs)
    for pair in opts.compare:
        table += compare_rows(runs, envs, *pair)
    table += provenance_rows(folder)
    (folder / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {folder / 'curves.png'} and {folder / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
