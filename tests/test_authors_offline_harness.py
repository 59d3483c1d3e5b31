"""The authors' offline loop run by benchmarks/parity/xql_authors_offline.py logs what the runner reads,
and a run resumed from its checkpoint goes on exactly as the unstopped run. Runs when a clone of
github.com/Div99/XQL is named by XQL_AUTHORS_REPO and benchmarks/parity/requirements.txt is installed;
skipped with the reason otherwise."""

import importlib.util
import json
import os
import shutil

import pytest
from conftest import read_scalars, run_script

from tools import make_offline_dataset as mk

REPO = os.environ.get("XQL_AUTHORS_REPO")
if not REPO or not os.path.isfile(os.path.join(REPO, "offline", "train_offline.py")):
    pytest.skip("XQL_AUTHORS_REPO does not name a clone of github.com/Div99/XQL", allow_module_level=True)
for package in ("gym", "jax", "flax", "optax", "tensorflow_probability", "ml_collections"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} missing: pip install -r benchmarks/parity/requirements.txt", allow_module_level=True)
HARNESS = "benchmarks/parity/xql_authors_offline.py"


def test_a_resumed_run_goes_on_exactly_as_the_unstopped_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    episodes = mk.rollout("Hopper-v5", "random", steps=3000, seed=0)
    mk.write_hdf5(str(tmp_path / "hopper-medium.hdf5"), mk.episodes_to_d4rl(episodes), "Hopper-v5", -20.272305, 3234.3)
    flags = "--total-timesteps 600 --eval-frequency 300 --eval-episodes 1 --checkpoint-frequency 300 --seed 2"
    args = ["--authors-repo", REPO, "--dataset", tmp_path / "hopper-medium.hdf5", *flags.split(), "--authors-flags=--temp=2"]
    proc = run_script(HARNESS, args, whole, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the checkpoint kept at step 300 (their loop ends at 600 without another) resumed in a fresh folder
    (checkpoint,) = (whole / "runs").glob("*/checkpoint.pt")
    (resumed / "runs" / checkpoint.parent.name).mkdir(parents=True)
    shutil.copy(checkpoint, resumed / "runs" / checkpoint.parent.name)
    proc = run_script(HARNESS, ["--resume", checkpoint.relative_to(whole)], resumed, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 300 of 600" in proc.stdout
    a, b = read_scalars(whole), read_scalars(resumed)
    assert set(a) == set(b) and "eval/normalized_score" in a and "training/value_loss" in a
    for tag in a:  # everything after the checkpoint: losses, evaluations, the best evaluation so far
        assert [(s, v) for s, v in a[tag] if s > 300] == b[tag], tag
    peer = json.loads((whole / "peer.json").read_text())
    assert peer["peer_commit"] and any("resume" in shim for shim in peer["shims"])
