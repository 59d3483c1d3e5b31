"""CORL's IQL run by benchmarks/parity/corl_iql.py logs what the runner reads. Runs when a clone of
github.com/tinkoff-ai/CORL is named by CORL_REPO and pyrallis and gym are installed; skipped with the
reason otherwise."""

import importlib.util
import json
import os

import pytest
from conftest import read_scalars, run_script

from tools import make_offline_dataset as mk

REPO = os.environ.get("CORL_REPO")
if not REPO or not os.path.isfile(os.path.join(REPO, "algorithms", "offline", "iql.py")):
    pytest.skip("CORL_REPO does not name a clone of github.com/tinkoff-ai/CORL", allow_module_level=True)
for package in ("pyrallis", "gym"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} missing: pip install -r benchmarks/parity/requirements.txt", allow_module_level=True)


def test_corl_iql_on_our_file_logs_scores_the_runner_reads_and_says_what_it_ran(workdir):
    episodes = mk.rollout("Hopper-v5", "random", steps=3000, seed=0)
    mk.write_hdf5(str(workdir / "hopper-medium.hdf5"), mk.episodes_to_d4rl(episodes), "Hopper-v5", -20.272305, 3234.3)
    flags = "--dataset hopper-medium.hdf5 --total-timesteps 1000 --eval-frequency 500 --eval-episodes 2 --seed 3"
    proc = run_script("benchmarks/parity/corl_iql.py", ["--corl-repo", REPO, *flags.split()], workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(workdir)
    scores, returns = scalars["eval/normalized_score"], scalars["eval/episodic_return"]
    assert [s for s, _ in scores] == [s for s, _ in returns] == [500, 1000]  # the count of steps done
    for (_, score), (_, ret) in zip(scores, returns):  # D4RL's normalisation, undone
        assert ret == pytest.approx(-20.272305 + score / 100 * (3234.3 + 20.272305), rel=1e-4)
    assert [s for s, _ in scalars["losses/value_loss"]] == [1000]
    peer = json.loads((workdir / "peer.json").read_text())
    assert peer["peer_commit"] and peer["shims"]
    assert peer["their_flags"][:4] == ["--env", "hopper-medium-v2", "--seed", "3"]
