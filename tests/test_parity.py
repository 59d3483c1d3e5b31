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
