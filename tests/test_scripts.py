"""The shape every script keeps (README, "The shape of a script"): the algorithm first, the run-keeping
code after train(), short enough to read, every flag explained, nothing shared between scripts, and
every script stops a run whose values run past any return its rewards allow."""

import ast
import importlib
import io
import os
import re
import tokenize

import pytest
import torch
from conftest import ROOT, run_script

SCRIPTS = ["iq_continuous.py", "miq_continuous.py", "xql_sac.py", "xql_td3.py", "xql_offline.py"]
SCRIPTS += ["soft_dqn_atari.py", "soft_a2c_atari.py"]
RUN_KEEPING = {
    "exp_name", "seed", "torch_deterministic", "cuda", "eval_frequency", "eval_episodes", "eval_epsilon",
    "log_frequency", "save_model", "checkpoint_frequency", "checkpoint_buffer", "resume", "stop_at",
    "eval_model", "capture_video", "track", "wandb_project_name", "wandb_entity",
}  # fmt: skip


def source(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


@pytest.mark.parametrize("script", SCRIPTS)
def test_length_and_line_width(script):
    lines = source(script).splitlines()
    # progress, input checks, exact resumes and the run-keeping calls of train() took each script
    # past its length of 2026-12-07's start (572, 592, 600, 563, 700, 668, 580); issue 52 asks for
    # those and 300 lines fewer in all: not reached yet, these caps stop any growth meanwhile
    caps = {"iq_continuous.py": 650, "miq_continuous.py": 670, "xql_sac.py": 710, "xql_td3.py": 650}
    caps.update({"xql_offline.py": 780, "soft_dqn_atari.py": 740, "soft_a2c_atari.py": 650})
    assert len(lines) <= caps[script], f"{script}: {len(lines)} lines"
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not wide, f"{script}: lines over 100 characters: {wide}"
    tree = ast.parse(source(script))
    assert len(ast.get_docstring(tree).splitlines()) <= 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_algorithm_first_then_train_then_the_appendix(script):
    tree = ast.parse(source(script))
    where = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            where.setdefault(node.name, node.lineno)
    first_network = min(
        n.lineno for n in tree.body if isinstance(n, ast.ClassDef) and any(getattr(b, "attr", "") == "Module" for b in n.bases)
    )
    assert first_network <= 170, f"{script}: the first network is at line {first_network}"
    assert where["Args"] < where["make_env"] < first_network < where["train"] < where["check_args"]
    # every loss or target function is defined before train(), everything run-keeping after it
    for name, line in where.items():
        if re.search(r"(loss|target)", name) and not name.startswith("check"):
            assert line < where["train"], f"{script}: {name} comes after train()"
    for name in ("check_args", "start_run", "log_update", "evaluate", "Run", "Progress", "load_checkpoint", "resume_args"):
        assert where[name] > where["train"], f"{script}: {name} comes before train(), or is missing"
    main = tree.body[-1]
    assert isinstance(main, ast.If) and ast.unparse(main.body[0]) == "train(tyro.cli(Args))" and len(main.body) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_explained_and_the_algorithms_come_first(script):
    """tyro shows a field's docstring, or the comment on its line (CORL's style), as its --help
    text: a field without either has none (as --log-frequency of xql_offline.py had). The
    algorithm's fields come before the run-keeping ones."""
    text = source(script)
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT}
    args = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Args")
    body = args.body
    fields = [(i, n.target.id) for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    for i, name in fields:
        doc = body[i + 1] if i + 1 < len(body) else None
        if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            assert doc.value.value.strip(), f"{script}: --{name} has empty help"
        else:
            comment = comments.get(body[i].end_lineno, "").lstrip("# ")
            assert comment and not comment.startswith("fmt:"), f"{script}: --{name} has no help"
    names = [name for _, name in fields]
    first_run_keeping = min(i for i, name in enumerate(names) if name in RUN_KEEPING)
    assert all(name in RUN_KEEPING for name in names[first_run_keeping:]), f"{script}: {names}"
    assert first_run_keeping >= 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_share_nothing(script):
    text = source(script)
    for other in SCRIPTS:
        module = other[:-3]
        assert not re.search(rf"^\s*(from|import)\s+{module}\b", text, re.M), f"{script} imports {other}"


VALUE_CHECKED = ["xql_sac", "xql_td3", "iq_continuous", "miq_continuous", "xql_offline"]
VALUE_CHECKED += ["soft_dqn_atari", "soft_a2c_atari"]


@pytest.mark.parametrize("module", VALUE_CHECKED)
def test_values_beyond_any_return_stop_the_run(module):
    check_values = importlib.import_module(module).check_values
    atari = module.endswith("_atari")  # given max |r| itself: its rewards are clipped to +-1
    rewards = 2.0 if atari else torch.tensor([0.5, -2.0, 1.0, 0.0])  # gamma 0.9, bonus 1: bound 30
    for q in (299.0, -299.0):  # within ten times the bound: the run goes on
        check_values(torch.full((8,), q), rewards, 0.9, 1.0, step=7)
    with pytest.raises(SystemExit, match=r"^error: the values diverged at step 7 .*> 10 x 30\)"):
        check_values(torch.full((8,), -301.0), rewards, 0.9, 1.0, step=7)
    with pytest.raises(SystemExit):  # the bonus counts: without it the bound is 20
        check_values(torch.full((8,), 201.0), rewards, 0.9, 0.0, step=7)
    check_values(torch.full((8,), 1e9), 0.0 if atari else torch.zeros(4), 0.9, 0.0, step=7)  # no bound


@pytest.mark.parametrize("script, flags", [
    ("xql_sac.py", ["--q-lr", 1.0]), ("iq_continuous.py", ["--learning-rate", 10.0]),
])  # fmt: skip
def test_a_run_whose_values_run_away_with_finite_losses_stops(script, flags, tmp_path):
    # gamma 0.5 on Pendulum (|r| <= 16.3): no return can exceed 33; the large step sizes blow the
    # values far past that within a few hundred steps while every loss stays finite
    args = ["--env-id", "Pendulum-v1", "--gamma", 0.5, "--learning-starts", 200, "--total-timesteps",
            1000, "--log-frequency", 10, "--eval-frequency", 1000, "--no-cuda", *flags]  # fmt: skip
    proc = run_script(script, args, tmp_path, timeout=300)
    assert proc.returncode != 0, proc.stdout[-500:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: the values diverged at step \d+ \(mean \|[QV]\| ", last), last


def top_level_blocks(script):
    """Each top-level function and class of a script, by name: its source, decorators included."""
    text = source(script)
    lines = text.splitlines()
    blocks = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            blocks[node.name] = "\n".join(lines[start - 1 : node.end_lineno])
    return blocks


# the run-keeping blocks every continuous script shares, and what each pair shares beyond them
CONTINUOUS_SHARED = ["make_env", "ReplayBuffer", "polyak", "check_action_space", "check_video_prerequisites",
                     "Run", "Progress", "load_checkpoint", "resume_args"]  # fmt: skip
PAIRS = {
    ("xql_sac.py", "xql_td3.py"): ["mlp", "Critic", "gumbel_loss", "evaluate_policy", "evaluate"],
    ("iq_continuous.py", "miq_continuous.py"): "all but the algorithm",
}
ALGORITHM = {"Args", "train", "update", "start_run", "log_update", "check_args", "iq_target", "miq_target"}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_blocks_two_scripts_share_are_identical(pair):
    """`diff xql_sac.py xql_td3.py` and `diff iq_continuous.py miq_continuous.py` show the algorithms:
    the blocks they share are the same character for character, as are the run-keeping blocks of all
    four continuous scripts."""
    a, b = (top_level_blocks(script) for script in pair)
    names = PAIRS[pair]
    if names == "all but the algorithm":
        assert set(a) - ALGORITHM == set(b) - ALGORITHM, set(a) ^ set(b)
        names = sorted(set(a) - ALGORITHM)
    for name in [*CONTINUOUS_SHARED, *names]:
        assert a[name] == b[name], f"{name} differs between {pair[0]} and {pair[1]}"
    assert top_level_blocks("xql_sac.py")["Run"] == top_level_blocks("iq_continuous.py")["Run"]




@pytest.mark.parametrize("script", SCRIPTS)
def test_train_reads_as_a_loop_with_the_run_keeping_in_few_calls(script):
    """train() at most 100 lines, of which at most a quarter keep the run (set-up, stops, logs,
    evaluation, checkpoints: the calls on `run` and the evaluation); the update is one call."""
    tree = ast.parse(source(script))
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    body = source(script).splitlines()[train.lineno : train.end_lineno]
    assert len(body) <= 100, f"{script}: train() has {len(body)} lines"
    keeping = [line for line in body if re.search(r"\brun\.\w+\(|start_run\(|log_update\(", line)]
    assert len(keeping) <= len(body) / 4, f"{script}: {len(keeping)} of {len(body)} lines keep the run"
    assert sum(bool(re.search(r"(?<![.\w])update\(", line)) for line in body) == 1
