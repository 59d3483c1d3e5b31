"""The benchmark runner (benchmarks/sweep.py) and plots (benchmarks/plot.py), end to end on a tiny
suite with a local Ray, as CI runs them; and their pieces on hand-made inputs."""

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(Path(ROOT) / "benchmarks"))
import plot  # noqa: E402
import sweep  # noqa: E402

SUITES = Path(ROOT) / "benchmarks" / "suites"


def test_every_committed_suite_loads_and_names_real_scripts():
    for path in SUITES.glob("*.toml"):
        name, runs = sweep.load_suite(path)
        assert runs, path
        assert len({r.run_id for r in runs}) == len(runs), f"{path}: two runs share an id"
        for r in runs:
            assert (Path(ROOT) / r.script).is_file()
            assert r.args[-4:] == ["--seed", str(r.seed), "--exp-name", r.variant]


def test_suite_expands_env_flags_root_and_per_variant_overrides(tmp_path):
    (tmp_path / "s.toml").write_text(
        'name = "t"\nenvs = ["a", "b"]\nseeds = [1, 2]\nenv_flags = "--dataset {root}/data/{env}.hdf5"\n'
        'flags = "--total-timesteps 10"\ncores_per_run = 2\n'
        '[[variants]]\nname = "X"\nscript = "xql_offline.py"\nflags = "--eta 0"\n'
        '[[variants]]\nname = "Y"\nscript = "xql_offline.py"\nseeds = [7]\ncores = 1\n'
    )
    name, runs = sweep.load_suite(tmp_path / "s.toml")
    assert name == "t" and len(runs) == 2 * 2 + 2 * 1
    x = runs[0]
    assert x.run_id == "a__X__1" and x.cores == 2
    assert x.args[:2] == ["--dataset", f"{ROOT}/data/a.hdf5"]
    assert "--eta" in x.args and "--total-timesteps" in x.args
    assert [r.seed for r in runs if r.variant == "Y"] == [7, 7] and runs[-1].cores == 1
    # the metadata's command runs from any clone's root: no absolute path of this checkout in it
    meta = sweep.run_meta(x, {}, "abc", None, None)
    assert (
        meta["command"].startswith("python xql_offline.py --dataset data/a.hdf5 ") and str(ROOT) not in meta["command"]
    )


def test_suite_columns_are_the_mean_of_a_tag_since_the_evaluation_before(tmp_path):
    (tmp_path / "s.toml").write_text(
        'envs = ["a"]\nseeds = [1]\n[columns]\ntrain_return = "charts/episodic_return"\n'
        '[[variants]]\nname = "X"\nscript = "xql_offline.py"\n'
    )
    _, (run,) = sweep.load_suite(tmp_path / "s.toml")
    assert run.columns == {"train_return": "charts/episodic_return"}
    scalars = {
        "eval/episodic_return": [(99, 5.0), (199, 7.0), (299, 9.0)],
        "charts/episodic_return": [(10, 1.0), (99, 3.0), (100, 10.0), (150, 20.0), (250, 40.0)],
    }
    rows = sweep.rows_from_events(scalars, run)
    assert [r["step"] for r in rows] == [100, 200, 300]
    # (1 + 3) / 2 up to the first evaluation, then (10 + 20) / 2, then 40 alone
    assert [r["train_return"] for r in rows] == [2.0, 15.0, 40.0]
    assert sweep.rows_from_events({"eval/episodic_return": [(99, 5.0)]}, run)[0]["train_return"] == ""
    # a script that logs the count of steps done (A2C) rather than the 0-based index: step_offset = 0
    counted = dataclasses.replace(run, step_offset=0)
    assert [r["step"] for r in sweep.rows_from_events(scalars, counted)] == [99, 199, 299]
    assert {r.step_offset for r in sweep.load_suite(SUITES / "atari-a2c.toml")[1]} == {0}


def test_suite_with_a_missing_script_is_a_one_line_error(tmp_path):
    (tmp_path / "s.toml").write_text('envs = ["a"]\nseeds = [1]\n[[variants]]\nname = "X"\nscript = "nope.py"\n')
    with pytest.raises(SystemExit, match="nope.py"):
        sweep.load_suite(tmp_path / "s.toml")


def test_bootstrap_ci_brackets_the_mean_and_matches_the_normal_interval_for_many_seeds():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 3, 4), rng.normal(10, 3, 400)
    m, lo, hi = plot.bootstrap_ci(small)
    assert lo < m < hi
    m2, lo2, hi2 = plot.bootstrap_ci(large)
    # with many seeds the percentile bootstrap matches the normal interval of the mean, 2*1.96*s/sqrt(n)
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * large.std() / np.sqrt(len(large)), rel=0.15)
    assert lo2 < 10 < hi2 and hi2 - lo2 < hi - lo
    assert plot.bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)


def test_normalised_score_uses_d4rl_references():
    run = {"eval_return": np.array([1500.0]), "normalized_score": None}
    assert plot.normalized_final(run, "Hopper-v5") == pytest.approx(46.71, abs=0.01)
    assert plot.normalized_final(run, "Pendulum-v1") is None


def write_fake_run(folder: Path, env: str, variant: str, seed: int, finals: float, score: float | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{env}__{variant}__{seed}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_id", "variant", "seed", "step", "eval_return"] + (["normalized_score"] if score else []))
        for step, frac in [(1000, 0.2), (2000, 0.6), (3000, 1.0)]:
            w.writerow([env, variant, seed, step, finals * frac] + ([score * frac] if score else []))


def test_plot_table_and_iqm_on_hand_made_runs(tmp_path):
    """5 seeds x 2 envs: the table's final return is the seeds' mean, and rliable's IQM is reported."""
    for seed in range(1, 6):
        write_fake_run(tmp_path, "Hopper-v5", "A", seed, 1000.0 + 100 * seed)
        write_fake_run(tmp_path, "HalfCheetah-v5", "A", seed, 3000.0)
        write_fake_run(tmp_path, "Hopper-v5", "B", seed, 500.0)
    assert plot.main([str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| Hopper-v5 | A | 5 | 3000 | 1300.0 [" in table  # 5 seeds: a bootstrap interval
    assert "| 1100.0 / 1200.0 / 1300.0 / 1400.0 / 1500.0 |" in table  # each seed's final return, in seed order
    assert "| Hopper-v5 | B | 5 | 3000 | 500.0 | 300.0 |" in table  # identical seeds: no interval to show
    iqm = table.split("IQM", 1)[1]
    assert "| A | 5 x 2 |" in iqm
    assert "| B | 5 x 1 | 16.0 | [16.0, 16.0] |" in iqm  # 100*(500 + 20.27)/(3234.3 + 20.27) = 15.99
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "final score" not in table  # online runs log no normalised score


def test_compare_tabulates_the_difference_of_two_variants_with_an_interval(tmp_path):
    """Fig. 3's question as a table: soft-q - pg-proper per game, final and AUC, with a bootstrap CI."""
    for seed, final in [(1, 10.0), (2, 14.0)]:
        write_fake_run(tmp_path, "PongNoFrameskip-v4", "pg-proper", seed, final)
    for seed, final in [(1, 4.0), (2, 6.0)]:
        write_fake_run(tmp_path, "PongNoFrameskip-v4", "soft-q", seed, final)
    assert plot.main([str(tmp_path), "--compare", "pg-proper", "soft-q"]) == 0
    table = (tmp_path / "results.md").read_text().split("soft-q - pg-proper", 1)[1]
    row = next(r for r in table.splitlines() if r.startswith("| PongNoFrameskip-v4"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["2 / 2", "3000"]
    # final: 5 - 12 = -7; 2 seeds a side: the range over pairs of seeds, 4 - 14 = -10 to 6 - 10 = -4
    assert cells[3] == "-7.0 (-10.0 to -4.0)"
    # AUC: the mean of 0.2, 0.6, 1.0 times the final, 0.6 * -7 = -4.2, range 0.6 * (-10, -4)
    assert cells[4] == "-4.2 (-6.0 to -2.4)"
    with pytest.raises(SystemExit, match="no runs of \\['kl'\\]"):
        plot.main([str(tmp_path), "--compare", "pg-proper", "kl"])
    # given twice, both tables are kept, each with its own sign
    assert plot.main([str(tmp_path), "--compare", "pg-proper", "soft-q", "--compare", "soft-q", "pg-proper"]) == 0
    tables = (tmp_path / "results.md").read_text()
    assert (
        "soft-q - pg-proper" in tables
        and "| 2 / 2 | 3000 | 7.0 (4.0 to 10.0) |" in tables.split("pg-proper - soft-q")[1]
    )


def test_training_return_column_is_plotted_and_compared_when_every_run_has_it(tmp_path):
    """Atari CSVs carry the training games' return per evaluation window: a second row of panels,
    and its last window and mean in the --compare table."""
    for variant, scale in [("pg-proper", 1.0), ("soft-q", 2.0)]:
        with open(tmp_path / f"BreakoutNoFrameskip-v4__{variant}__1.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env_id", "variant", "seed", "step", "eval_return", "train_return"])
            for step, frac in [(1000, 0.2), (2000, 0.6), (3000, 1.0)]:
                w.writerow(["BreakoutNoFrameskip-v4", variant, 1, step, 10 * frac, scale * 10 * frac])
    assert plot.main([str(tmp_path), "--compare", "pg-proper", "soft-q"]) == 0
    table = (tmp_path / "results.md").read_text().split("soft-q - pg-proper", 1)[1]
    assert "training return, last window | training return, mean |" in table
    row = next(r for r in table.splitlines() if r.startswith("| BreakoutNoFrameskip-v4"))
    # eval returns equal: 0 apart; training returns: 20 - 10 = 10 at the end, 12 - 6 = 6 on average
    assert row.endswith("| 0.0 | 0.0 | 10.0 | 6.0 |"), row


def test_atari_random_scores_are_found_from_the_env_id():
    assert plot.atari_random("BreakoutNoFrameskip-v4") == 1.7
    assert plot.atari_random("ALE/Pong-v5") == -20.7
    assert plot.atari_random("Hopper-v5") is None


def test_offline_table_gives_the_final_normalised_score(tmp_path):
    for seed, score in [(1, 10.0), (2, 20.0), (3, 30.0)]:
        write_fake_run(tmp_path, "hopper-medium", "X-QL", seed, 400.0, score)
    assert plot.main([str(tmp_path)]) == 0
    row = next(r for r in (tmp_path / "results.md").read_text().splitlines() if r.startswith("| hopper-medium"))
    # 3 seeds: the range of the seeds, never a "95% interval" (a bootstrap of 3 gives [lowest, highest])
    assert row == "| hopper-medium | X-QL | 3 | 3000 | 400.0 | 240.0 | 20.0 (10.0 to 30.0) | 400.0 / 400.0 / 400.0 |"
    assert "lowest to highest seed" in (tmp_path / "results.md").read_text()
    for seed, score in [(1, 12.0), (2, 18.0), (3, 25.0)]:  # 2 envs x 3 seeds: an IQM, but no interval
        write_fake_run(tmp_path, "hopper-replay", "X-QL", seed, 300.0, score)
    assert plot.main([str(tmp_path)]) == 0
    assert "| X-QL | 3 x 2 |" in (tmp_path / "results.md").read_text()
    assert "| none: 3 seeds an env |" in (tmp_path / "results.md").read_text()


def test_summary_uses_the_range_below_five_seeds_and_a_seeded_bootstrap_from_five(tmp_path):
    assert plot.summary([1.0, 5.0, 3.0]) == (3.0, 1.0, 5.0, "range")
    mean, lo, hi, kind = plot.summary([1.0, 2.0, 3.0, 4.0, 10.0])
    assert kind == "ci" and mean == 4.0 and 1.0 < lo < mean < hi < 10.0
    assert plot.diff_summary([1.0, 2.0], [5.0, 9.0]) == (5.5, 3.0, 8.0, "range")
    # the same CSVs give the same results.md byte for byte (the IQM's bootstrap is seeded too)
    for seed in range(1, 6):
        write_fake_run(tmp_path, "hopper-medium", "X-QL", seed, 400.0 + 37 * seed, 10.0 + 3 * seed)
        write_fake_run(tmp_path, "hopper-replay", "X-QL", seed, 300.0 + 11 * seed**2, 5.0 + seed**2)
    assert plot.main([str(tmp_path)]) == 0
    first = (tmp_path / "results.md").read_bytes()
    assert b"| X-QL | 5 x 2 |" in first and b"none:" not in first
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_bytes() == first


def test_runner_and_plots_end_to_end_with_local_ray(tmp_path):
    """The CI suite: 2 short runs through a local Ray, CSVs and metadata, a skip on rerun, a failing
    run reported with its log tail while the other finishes, then the plots."""
    pytest.importorskip("ray")
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(Path(ROOT) / "benchmarks" / "sweep.py"), str(SUITES / "ci-tiny.toml")]
    cmd += ["--results", str(results), "--workdir", str(work), "--num-cpus", "2", "--allow-dirty"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done 2, failed 0" in proc.stdout
    out = results / "ci-tiny"
    for variant in ["IQ", "X-TD3"]:
        with open(out / f"Pendulum-v1__{variant}__1.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == [200, 400]
        assert all(r["env_id"] == "Pendulum-v1" and r["variant"] == variant for r in rows)
        assert all(-2000 < float(r["eval_return"]) < 0 for r in rows)
        meta = json.loads((out / f"Pendulum-v1__{variant}__1.json").read_text())
        for key in ["command", "flags", "commit", "wall_time_s", "sps", "peak_memory_mb", "machine"]:
            assert key in meta, key
        assert meta["peak_memory_mb"] > 50 and meta["wall_time_s"] > 0
    # a rerun skips what is done
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 already done, 0 to run" in again.stdout
    # a column added to the suite after its runs: --rewrite makes the CSVs again from the events
    with_column = tmp_path / "with_column.toml"
    text = (SUITES / "ci-tiny.toml").read_text()
    at = text.index("[[variants]]")
    with_column.write_text(text[:at] + '[columns]\nsps = "charts/SPS"\n' + text[at:])
    meta_before = (out / "Pendulum-v1__IQ__1.json").read_text()
    assert sweep.main([str(with_column), "--results", str(results), "--workdir", str(work), "--rewrite"]) == 0
    with open(out / "Pendulum-v1__IQ__1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [200, 400] and all(float(r["sps"]) > 0 for r in rows)
    assert (out / "Pendulum-v1__IQ__1.json").read_text() == meta_before
    # a failing run is reported with its log tail, and the other run still finishes
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (SUITES / "ci-tiny.toml").read_text().replace('name = "ci-tiny"', 'name = "bad"')
        + '\n[[variants]]\nname = "broken"\nscript = "iq_continuous.py"\nflags = "--tau -1"\n'
    )
    proc = subprocess.run([*cmd[:2], str(bad), *cmd[3:], "--only", "__"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "Pendulum-v1__broken__1 FAILED" in proc.stdout and "error: --tau must be > 0" in proc.stdout
    assert "done 2, failed 1" in proc.stdout
    # and the plots
    plotted = subprocess.run(
        [sys.executable, str(Path(ROOT) / "benchmarks" / "plot.py"), str(out)], capture_output=True, text=True
    )
    assert plotted.returncode == 0, plotted.stderr
    assert (out / "curves.png").exists() and "| Pendulum-v1 | IQ | 1 | 400 |" in (out / "results.md").read_text()


def test_import_of_runs_made_by_hand(tmp_path):
    """A run made by hand with --exp-name VARIANT lands in results/<suite>/ like a runner's run."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "runs" / "Pendulum-v1__IQ__1__1700000000"))
    for step, value in [(199, -1400.0), (399, -900.0)]:
        writer.add_scalar("eval/episodic_return", value, step)
        writer.add_scalar("charts/SPS", 150, step)
    writer.close()
    _, runs = sweep.load_suite(SUITES / "ci-tiny.toml")
    done = sweep.import_runs(tmp_path, runs, tmp_path / "out", "abc123")
    assert done == ["Pendulum-v1__IQ__1"]  # X-TD3 has no run by hand: nothing to import
    with open(tmp_path / "out" / "Pendulum-v1__IQ__1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["eval_return"])) for r in rows] == [(200, -1400.0), (400, -900.0)]
    meta = json.loads((tmp_path / "out" / "Pendulum-v1__IQ__1.json").read_text())
    assert meta["commit"] == "abc123" and meta["imported_from"].startswith("Pendulum-v1__IQ__1__")
    assert sweep.import_runs(tmp_path, runs, tmp_path / "out", "abc123") == []  # already there


def test_runner_resumes_a_run_stopped_part_way_from_its_checkpoint(tmp_path):
    """A run cut short (here --stop-at, as a session's end or a job's time limit would) is continued from
    its checkpoint by the next execute(), not restarted: the CSV has both halves' evaluations."""
    _, runs = sweep.load_suite(SUITES / "ci-tiny.toml")
    run = next(r for r in runs if r.variant == "IQ")
    rundir = tmp_path / run.suite / run.run_id
    rundir.mkdir(parents=True)
    first = sweep.execute(dataclasses.replace(run, args=[*run.args, "--stop-at", "300"]), str(ROOT), str(tmp_path))
    assert "stopped by --stop-at" in (rundir / "log.txt").read_text()
    assert first["meta"]["segments"][0]["resumed_from"] is None
    result = sweep.execute(run, str(ROOT), str(tmp_path))
    # each piece of the run is on record: where it ran, from which checkpoint, how it ended
    pieces = result["meta"]["segments"]
    assert pieces[0]["resumed_from"] is None and pieces[1]["resumed_from"].endswith("checkpoint.pt")
    assert [p["exit"] for p in pieces] == [0, 0] and all(p["host"] and p["wall_s"] > 0 for p in pieces)
    assert all(p["commit"] == result["meta"]["commit"] == sweep.code_state(Path(ROOT))["commit"] for p in pieces)
    assert "resumed" in (rundir / "log.txt").read_text()
    assert [row["step"] for row in result["rows"]] == [200, 400]  # 200 from the first part, 400 after the resume
    assert len(list((rundir / "runs").iterdir())) == 1  # one TensorBoard run, continued
    assert result["meta"]["wall_time_s"] > 0


def test_a_suite_run_that_ends_early_by_stop_at_still_ends_there_after_a_resume(tmp_path):
    """atari-a2c ends its runs at --stop-at on the default schedule: a run interrupted before then and
    resumed by the runner must stop at the suite's step, not go on to --total-timesteps."""
    _, runs = sweep.load_suite(SUITES / "ci-tiny.toml")
    run = next(r for r in runs if r.variant == "IQ")
    run = dataclasses.replace(run, args=[*run.args, "--stop-at", "300"])
    rundir = tmp_path / run.suite / run.run_id
    rundir.mkdir(parents=True)
    interrupted = [*run.args[:-2], "--stop-at", "150"]
    sweep.execute(dataclasses.replace(run, args=interrupted), str(ROOT), str(tmp_path))
    result = sweep.execute(run, str(ROOT), str(tmp_path))
    log = (rundir / "log.txt").read_text()
    assert "stopped by --stop-at at step 300" in log, log[-2000:]
    assert [row["step"] for row in result["rows"]] == [200]  # no evaluation at 400: the run ended at 300


def test_wall_time_of_a_resumed_run_leaves_out_the_time_it_was_stopped():
    # events every 2 s for 100 s, stopped for a day, then 50 s more after the resume
    times = [1000.0 + 2 * i for i in range(51)] + [1000.0 + 86400 + 2 * i for i in range(26)]
    assert sweep.active_seconds(times) == pytest.approx(150.0)
    assert sweep.active_seconds([5.0]) == 0.0 and sweep.active_seconds([]) is None


def test_diagnostics_and_paper_tables_come_from_the_suites_columns_and_paper_json(tmp_path):
    """A suite's own columns get a table at the last evaluation; paper.json puts a paper's numbers
    beside ours, with the data's level from datasets.json; results.md names the command that made it."""
    for seed, v in [(1, 80.0), (2, 100.0)]:
        with open(tmp_path / f"hopper-medium__X-QL__{seed}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env_id", "variant", "seed", "step", "eval_return", "normalized_score", "v_values", "capped_frac"])
            w.writerow(["hopper-medium", "X-QL", seed, 1000, 100.0, 10.0 * seed, 1.0, 0.5])
            w.writerow(["hopper-medium", "X-QL", seed, 2000, 200.0, 20.0 * seed, v, 0.001 * seed])
    (tmp_path / "paper.json").write_text(json.dumps({
        "source": "Table 1",
        "metric": "normalized_score",
        "columns": [["BC", "BC"], ["X-QL", "X-QL C"]],
        "scores": {"hopper-medium": {"BC": 52.9, "X-QL C": 71.1}, "hopper-medium-replay": {"X-QL C": 97.3}},
    }))
    (tmp_path / "datasets.json").write_text(json.dumps({"Hopper-v5": {"datasets": {"hopper-medium": {"normalised_mean": 39.1}}}}))
    assert plot.main([str(tmp_path), "--compare", "X-QL", "X-QL"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert f"Made by `python benchmarks/plot.py {tmp_path} --compare X-QL X-QL`" in table
    assert "| env | variant | seeds | step | v_values | capped_frac |" in table
    assert "| hopper-medium | X-QL | 2 | 2000 | 90.0 (80.0 to 100.0) | 0.002 (0.001 to 0.002) |" in table
    assert "| env | data level | BC | BC, paper | X-QL | X-QL C, paper |" in table
    assert "| hopper-medium | 39.1 | – | 52.9 | 30.0 (20.0 to 40.0) (2) | 71.1 |" in table
    assert "| hopper-medium-replay | – | – | – | – | 97.3 |" in table
    (tmp_path / "paper.json").unlink()
    assert plot.main([str(tmp_path)]) == 0
    assert "Beside Table 1" in table and "Beside" not in (tmp_path / "results.md").read_text()


RECORD_FIELDS = ["script", "argv", "commit", "dirty", "diff_sha256", "versions", "datasets", "threads", "host"]
RECORD_FIELDS += ["segments", "wall_time_s", "peak_memory_mb", "sps", "steps_per_wall_second", "imported"]


def test_a_suite_at_a_commit_stopped_by_sigterm_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """ci-tiny's two runs (the second made longer, so the stop lands inside it) from a worktree of HEAD,
    one lane: SIGTERM to the driver while the second runs, then the same command again. The finished
    run is not run again; the stopped one resumes from its checkpoint and ends with the CSV of a run
    never stopped; its record, written by the run's own process, has every field."""
    pytest.importorskip("ray")
    text = (SUITES / "ci-tiny.toml").read_text()
    suite = tmp_path / "ci-tiny.toml"
    suite.write_text(text + 'flags = "--total-timesteps 1600 --eval-frequency 400"\n')  # X-TD3's, last
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(Path(ROOT) / "benchmarks" / "sweep.py"), str(suite), "--at", "HEAD"]
    cmd += ["--results", str(results), "--workdir", str(work), "--num-cpus", "1"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, long_run = results / "ci-tiny", work / "ci-tiny" / "Pendulum-v1__X-TD3__1"
    deadline = time.time() + 300
    log_txt = long_run / "log.txt"  # its first evaluation's line: the stop lands in training, after a logged step
    while not (log_txt.exists() and "step 400:" in log_txt.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    log = driver.communicate(timeout=300)[0]
    assert driver.returncode == 3, log[-3000:]
    assert "stopped Pendulum-v1__X-TD3__1" in log and (out / "Pendulum-v1__IQ__1.csv").exists()
    assert not (out / "Pendulum-v1__X-TD3__1.csv").exists() and list(long_run.glob("runs/*/checkpoint.pt"))
    done_before = (out / "Pendulum-v1__IQ__1.json").read_text()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "1 already done, 1 to run" in again.stdout, again.stdout[-3000:]
    assert (out / "Pendulum-v1__IQ__1.json").read_text() == done_before
    record = json.loads((out / "Pendulum-v1__X-TD3__1.json").read_text())
    assert record == json.loads((long_run / "record.json").read_text())  # the committed JSON is the record
    for key in RECORD_FIELDS:
        assert key in record, key
    first, second = record["segments"]
    assert first["exit"] == 143 and first["resumed_from"] is None and 400 <= first["steps"] < 1600
    assert second["exit"] == 0 and second["resumed_from"].endswith("checkpoint.pt") and second["steps"] == 1600
    tree = work / "trees" / record["commit"][:12]
    assert record["commit"] == sweep.git(Path(ROOT), "rev-parse", "HEAD") and record["dirty"] is False
    assert record["argv"][1] == "xql_td3.py" and set(record["versions"]) == {"python", *sweep.PACKAGES}
    assert record["peak_memory_mb"] > 50 and record["imported"] is False
    for seg in record["segments"]:
        assert seg["started"] < seg["ended"] and seg["host"] and seg["peak_memory_mb"] > 50

    # the same run, never stopped, from the same commit
    _, runs = sweep.load_suite(suite)
    run = next(r for r in runs if r.variant == "X-TD3")
    whole = sweep.execute(run, str(tree), str(tmp_path / "whole"))
    with open(out / "Pendulum-v1__X-TD3__1.csv") as f:
        resumed_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in resumed_rows] == [400, 800, 1200, 1600]
    assert [float(r["eval_return"]) for r in resumed_rows] == [r["eval_return"] for r in whole["rows"]]


def test_a_dirty_tree_is_refused_without_at_or_allow_dirty(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "git", lambda root, *args: " M xql_sac.py" if args[0] == "status" else "")
    with pytest.raises(SystemExit, match="--allow-dirty"):
        sweep.main([str(SUITES / "ci-tiny.toml"), "--results", str(tmp_path), "--workdir", str(tmp_path)])


def test_results_md_lists_the_runs_commits_and_flags_a_suite_whose_scripts_differ(tmp_path, monkeypatch):
    record = {"suite": "t", "script": "xql_sac.py", "versions": {"python": "3.11.7", "torch": "2.13.0"}}
    for i, commit in enumerate(["a" * 40, "a" * 40, "b" * 40]):
        write_fake_run(tmp_path, "Pendulum-v1", "X", i + 1, -150.0)
        run = dict(record, run_id=f"Pendulum-v1__X__{i + 1}", commit=commit, dirty=False, imported=False)
        (tmp_path / f"Pendulum-v1__X__{i + 1}.json").write_text(json.dumps(run) + "\n")
    monkeypatch.setattr(plot, "script_blob", lambda commit, script: "same")
    monkeypatch.setattr(plot, "changed_lines", lambda a, b, script: 7)
    rows = "\n".join(plot.provenance_rows(tmp_path))
    assert "| aaaaaaa | runner | 2 | python 3.11.7, torch 2.13.0 |" in rows and "| bbbbbbb | runner | 1 |" in rows
    assert "Mixed code" not in rows  # two commits, one version of the script
    monkeypatch.setattr(plot, "script_blob", lambda commit, script: commit[:1])
    rows = "\n".join(plot.provenance_rows(tmp_path))
    assert "**Mixed code:** the runs of xql_sac.py come from 2 different versions of it" in rows
    assert "lines changed from aaaaaaa: 7" in rows


def test_a_run_counts_under_the_commits_of_its_segments_since_its_last_fresh_start(tmp_path, monkeypatch):
    def segment(commit, resumed):
        return {"commit": commit, "dirty": False, "resumed_from": "runs/x/checkpoint.pt" if resumed else None}

    cases = {  # a stopped start, then the whole run afresh; a run resumed at another commit; old records
        1: [segment("a" * 40, False), segment("b" * 40, False)],
        2: [segment("a" * 40, False), segment("c" * 40, True)],
        3: [{"resumed_from": None}],
    }
    for seed, segments in cases.items():
        write_fake_run(tmp_path, "Pendulum-v1", "X", seed, -150.0)
        run = dict(run_id=f"Pendulum-v1__X__{seed}", suite="t", script="xql_sac.py", commit="a" * 40, dirty=False)
        (tmp_path / f"Pendulum-v1__X__{seed}.json").write_text(json.dumps(dict(run, segments=segments)) + "\n")
    monkeypatch.setattr(plot, "script_blob", lambda commit, script: "same")
    rows = "\n".join(plot.provenance_rows(tmp_path))
    assert "| bbbbbbb | runner | 1 |" in rows and "| aaaaaaa then ccccccc | runner | 1 |" in rows
    assert "| aaaaaaa | runner | 1 |" in rows  # the record without commits per segment: its own
