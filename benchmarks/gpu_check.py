"""Run all seven scripts for a few thousand steps on a GPU and print each one's steps per second.

    python benchmarks/gpu_check.py                 # on a machine with CUDA (about 3 minutes)
    python benchmarks/gpu_check.py --device cpu    # the same runs on the CPU (one thread each)

Each script runs as a user would run it (a subprocess, `--cuda` or `--no-cuda`, one evaluation
episode at the end), in a temporary folder; the offline script trains on a small random-play
Hopper dataset made with tools/make_offline_dataset.py. For every run the table gives whether it
finished, the device the script printed, and its steady-state SPS: steps (gradient steps offline)
per second after the warm-up, from the wall-clock times TensorBoard keeps with `charts/SPS`. A run
that fails prints the tail of its log. Exit status 1 if any run failed.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLINE = "--total-timesteps 4000 --learning-starts 1000 --eval-frequency 4000 --eval-episodes 1"
ATARI = "--eval-episodes 1 --max-episode-frames 2000"
# X-SAC at the authors' full DeepMind Control settings (configs/xsac.yaml): docs/xql_online.md
AUTHORS_XSAC = ("--beta 2 --hidden-size 1024 --batch-size 1024 --policy-lr 1e-4 --q-lr 1e-4 --alpha 0.1 "
                "--target-network-frequency 2 --policy-repeats 1 --ortho-init --exp-clip 10")
RUNS = [  # name, script, flags, steps before the SPS window
    ("IQ Hopper-v5", "iq_continuous.py", f"--env-id Hopper-v5 {ONLINE}", 1500),
    ("M-IQ Hopper-v5", "miq_continuous.py", f"--env-id Hopper-v5 {ONLINE}", 1500),
    ("X-SAC Hopper-v5", "xql_sac.py", f"--env-id Hopper-v5 {ONLINE}", 1500),
    ("X-SAC cheetah-run", "xql_sac.py", f"--env-id dm_control/cheetah-run-v0 {ONLINE}", 1500),
    ("X-SAC walker, authors", "xql_sac.py", f"--env-id dm_control/walker-run-v0 {AUTHORS_XSAC} {ONLINE}", 1500),
    ("X-TD3 Hopper-v5", "xql_td3.py", f"--env-id Hopper-v5 {ONLINE}", 1500),
    ("X-QL offline", "xql_offline.py", "--dataset {data} --total-timesteps 4000 --eval-frequency 4000 "
     "--eval-episodes 1 --log-frequency 100", 500),
    ("soft DQN Breakout", "soft_dqn_atari.py", f"--total-timesteps 6000 --learning-starts 2000 "
     f"--buffer-size 10000 --eval-frequency 6000 {ATARI}", 2500),
    ("soft A2C Breakout", "soft_a2c_atari.py", f"--total-timesteps 16000 --eval-frequency 16000 "
     f"--log-frequency 10 {ATARI}", 2000),
]  # fmt: skip


def steady_sps(run_dir: str, after: int) -> float:
    """Steps per second between the first `charts/SPS` point past `after` and the last one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = [e for e in acc.Scalars("charts/SPS") if e.step >= after]
    if len(events) < 2:
        return float("nan")
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", nargs="*", default=None, help="run names containing any of these")
    opts = parser.parse_args()
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or pass --device cpu", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0) if opts.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {device_name}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "hopper-random.hdf5")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_offline_dataset.py"), "--env-id",
                        "Hopper-v5", "--policy", "random", "--steps", "5000", "--out", data],
                       check=True, capture_output=True)  # fmt: skip
        print(f"{'run':22} {'status':8} {'device':8} {'SPS':>8} {'wall s':>7}")
        for name, script, flags, after in RUNS:
            if opts.only and not any(o.lower() in name.lower() for o in opts.only):
                continue
            cwd = tempfile.mkdtemp(dir=tmp)
            cmd = [sys.executable, os.path.join(ROOT, script), *flags.format(data=data).split()]
            cmd += ["--cuda" if opts.device == "cuda" else "--no-cuda"]
            # on the CPU, one thread a run, as every committed CPU result (more threads oversubscribe)
            env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if opts.device == "cpu" else {}))
            start = time.time()
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
            wall = time.time() - start
            runs = glob.glob(os.path.join(cwd, "runs", "*"))
            if proc.returncode or len(runs) != 1:
                failed += 1
                print(f"{name:22} {'FAILED':8} {'':8} {'':>8} {wall:7.0f}\n{proc.stderr[-2000:]}")
                continue
            used = "cuda" if ", cuda" in proc.stdout or "; cuda" in proc.stdout else "cpu"
            print(f"{name:22} {'ok':8} {used:8} {steady_sps(runs[0], after):8.0f} {wall:7.0f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
