"""Gradient steps per second of xql_offline.py at the default sizes (batch 256, 256-256 networks).

    python benchmarks/bench_offline.py [--steps 6000]

Runs the script as a user would on a Hopper-shaped D4RL-format file (1M random transitions,
11-d observations, 3-d actions; the values do not change the cost) through the D4RL-name path
(hopper-medium-v2 in a temporary $D4RL_DATASET_DIR), with evaluation off, and reads the steady
state from the wall-clock times TensorBoard stores with `charts/SPS`. Prints the time a 1M-step
run would take at that rate.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6000)
    a = p.parse_args()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        n, rng = 1_000_000, np.random.default_rng(0)
        with h5py.File(os.path.join(tmp, "hopper_medium-v2.hdf5"), "w") as f:
            f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
            f["next_observations"] = rng.normal(size=(n, 11)).astype(np.float32)
            f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
            f["rewards"] = rng.normal(size=n).astype(np.float32)
            f["terminals"] = np.zeros(n, bool)
            f["timeouts"] = np.arange(n) % 1000 == 999
        cmd = [
            sys.executable,
            os.path.join(ROOT, "xql_offline.py"),
            "--dataset",
            "hopper-medium-v2",
            "--total-timesteps",
            str(a.steps),
            "--eval-frequency",
            str(10 * a.steps),
            "--eval-episodes",
            "1",
            "--log-frequency",
            "100",
        ]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, env=dict(os.environ, D4RL_DATASET_DIR=tmp))
        (run,) = glob.glob(os.path.join(tmp, "runs", "*"))
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        ev = [e for e in acc.Scalars("charts/SPS") if e.step >= 500]
        rate = (ev[-1].step - ev[0].step) / (ev[-1].wall_time - ev[0].wall_time)
        print(
            f"xql_offline.py, hopper-shaped 1M-transition dataset, batch 256, 256-256: {rate:.1f} gradient steps/s; "
            f"a 1M-step run: {1e6 / rate / 3600:.2f} h (plus evaluations)"
        )
