"""One update of ours beside the authors' own code (benchmarks/parity/). Runs when a clone of
github.com/Div99/XQL is named by XQL_AUTHORS_REPO and benchmarks/parity/requirements.txt is
installed; skipped with the reason otherwise."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT

REPO = os.environ.get("XQL_AUTHORS_REPO")
if not REPO or not os.path.isdir(os.path.join(REPO, "online", "research")):
    pytest.skip("XQL_AUTHORS_REPO does not name a clone of github.com/Div99/XQL", allow_module_level=True)
for package in ("gym", "yaml"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} missing: pip install -r benchmarks/parity/requirements.txt", allow_module_level=True)
OFFLINE = all(importlib.util.find_spec(p) is not None for p in ("jax", "flax", "optax", "tensorflow_probability"))

sys.path.insert(0, str(Path(ROOT) / "benchmarks" / "parity"))
import xql_online_update  # noqa: E402

FLOAT32_ROUNDING = 1e-5  # absolute, on quantities of order 1 (parameters move by the learning rate, 1e-4 to 1e-3)


@pytest.fixture(scope="module")
def tables():
    return xql_online_update.main(["--authors-repo", REPO])


@pytest.mark.parametrize("family, case", [("sac", 0), ("sac", 2), ("td3", 0), ("td3", 2)])
def test_with_their_options_set_to_ours_one_update_agrees_to_float32_rounding(tables, family, case):
    name = list(tables[family])[case]
    for quantity, d in tables[family][name]["diffs"].items():
        diff, moved = d if isinstance(d, tuple) else (d, None)
        assert diff < FLOAT32_ROUNDING, (name, quantity, diff)
        if moved is not None:  # the step moved them well beyond the difference (Polyak: 1.5e-6 against 3e-8)
            assert moved > 20 * diff, (name, quantity, moved, diff)


def test_the_one_sided_clip_differs_exactly_where_z_falls_below_minus_c(tables):
    sac = tables["sac"]["X-SAC, V 30 above its targets (z < -8)"]["diffs"]
    assert sac["value loss"] > 1.0
    diff, moved = sac["V parameters after the step"]
    assert diff > 0.5 * moved  # their clip leaves V where it was; ours moves it down
    assert sac["critic target y"] < FLOAT32_ROUNDING and sac["temperature loss"] < FLOAT32_ROUNDING
    td3 = tables["td3"]["X-TD3, Q 30 above its targets (z < -8)"]["diffs"]
    assert td3["critic loss (sum of both)"] > 1.0 and td3["critics parameters after the step"][0] > 1e-4


@pytest.fixture(scope="module")
def offline_table():
    if not OFFLINE:
        pytest.skip("jax, flax, optax or tfp-nightly missing: pip install -r benchmarks/parity/requirements.txt")
    import xql_offline_update

    return xql_offline_update.main(["--authors-repo", REPO])


def test_offline_update_with_their_critic_loss_agrees_to_float32_rounding(offline_table):
    """With their Huber critic loss put in ours (the harness does it), every parameter after the step
    agrees to rounding; the AWR weights and losses agree relative to their size."""
    diffs = offline_table["X-QL, their Huber critic loss in ours"]["diffs"]
    for name in ("policy", "V", "critics", "critics' Polyak averages"):
        diff, moved = diffs[f"{name} after the step"]
        assert diff < 1e-5 and moved > 1e-6, (name, diff, moved)
        assert diffs[f"{name}: share of parameters more than 1e-6 apart"] < 1e-3, name
    assert diffs["critic target y"] < 1e-4 and diffs["V loss"] < 1e-5


def test_offline_critic_loss_is_twice_theirs_and_their_noise_changes_the_update(offline_table):
    as_is = offline_table["X-QL"]["diffs"]
    # their Huber is half our squared error below 20: the losses differ by a factor 2, Adam's step not
    assert as_is["critic loss, ours - 2 x theirs (their Huber is (1/2) x^2 below 20)"] < 1e-3
    assert as_is["critics: share of parameters more than 1e-6 apart"] < 1e-2
    noisy = offline_table["X-QL, their --noise on"]["diffs"]
    assert noisy["V after the step"][0] > 1e-4  # their action noise moves V differently; ours has none
