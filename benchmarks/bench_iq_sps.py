"""Steady-state SPS of iq_continuous.py / miq_continuous.py against a SAC reference loop on Hopper-v5.

    python benchmarks/bench_iq_sps.py                 # both scripts and the SAC reference
    python benchmarks/bench_iq_sps.py --steps 12000   # longer measurement

Each script runs as a user would run it (a subprocess, default flags but a short warm-up and no
evaluation); its steady-state SPS is read from the wall-clock times TensorBoard stores with the
`charts/SPS` scalar, over the steps after the warm-up (so the fast random warm-up and the start-up
do not inflate it).

The SAC reference is CleanRL's `sac_continuous_action.py` update (256-256 actor and twin critics
with Polyak targets, autotuned entropy temperature, batch 256, Adam 3e-4/1e-3, one critic update
and one actor update per env step), written out below, because the `cleanrl` package available on
this machine's registry (0.4.8) predates gymnasium and cannot run CleanRL's current script.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_sps(script: str, steps: int, warmup: int, extra: list) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, script), "--env-id", "Hopper-v5", "--total-timesteps", str(steps),
               "--learning-starts", str(warmup), "--eval-frequency", str(10 * steps), "--eval-episodes", "1", *extra]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        (run,) = glob.glob(os.path.join(tmp, "runs", "*"))
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        events = [e for e in acc.Scalars("charts/SPS") if e.step >= warmup + 500]
        return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def sac_reference_sps(steps: int, warmup: int) -> float:
    """CleanRL-style SAC on Hopper-v5: one env step + one SAC update per step after the warm-up."""
    env = gym.make("Hopper-v5")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, o))

    actor = mlp(obs_dim, 2 * act_dim)
    qf1, qf2 = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    qf1_t, qf2_t = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    qf1_t.load_state_dict(qf1.state_dict())
    qf2_t.load_state_dict(qf2.state_dict())
    q_opt = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=1e-3)
    a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    log_alpha = torch.zeros(1, requires_grad=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=1e-3)

    def act(o):
        mean, log_std = actor(o).chunk(2, -1)
        log_std = -5 + 3.5 * (torch.tanh(log_std) + 1)
        dist = torch.distributions.Normal(mean, log_std.exp())
        u = dist.rsample()
        a = torch.tanh(u)
        return a, (dist.log_prob(u) - torch.log(1 - a.pow(2) + 1e-6)).sum(-1, keepdim=True)

    n = steps
    B = {"o": torch.zeros(n, obs_dim), "a": torch.zeros(n, act_dim), "r": torch.zeros(n, 1),
         "o2": torch.zeros(n, obs_dim), "d": torch.zeros(n, 1)}
    o, _ = env.reset(seed=0)
    t_start = None
    for t in range(steps):
        if t == warmup + 500:
            t_start = time.time()
        if t < warmup:
            a = env.action_space.sample()
        else:
            with torch.no_grad():
                a = act(torch.as_tensor(o, dtype=torch.float32)[None])[0][0].numpy()
        o2, r, term, trunc, _ = env.step(a)
        for k, v in zip("o a r o2 d".split(), [o, a, r, o2, term]):
            B[k][t] = torch.as_tensor(np.asarray(v, dtype=np.float32))
        o = env.reset()[0] if term or trunc else o2
        if t >= warmup:
            i = torch.randint(0, t + 1, (256,))
            bo, ba, br, bo2, bd = (B[k][i] for k in "o a r o2 d".split())
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                a2, lp2 = act(bo2)
                x2 = torch.cat([bo2, a2], 1)
                y = br + 0.99 * (1 - bd) * (torch.min(qf1_t(x2), qf2_t(x2)) - alpha * lp2)
            x = torch.cat([bo, ba], 1)
            q_loss = (qf1(x) - y).pow(2).mean() + (qf2(x) - y).pow(2).mean()
            q_opt.zero_grad()
            q_loss.backward()
            q_opt.step()
            pa, lp = act(bo)
            xa = torch.cat([bo, pa], 1)
            a_loss = (alpha * lp - torch.min(qf1(xa), qf2(xa))).mean()
            a_opt.zero_grad()
            a_loss.backward()
            a_opt.step()
            alpha_loss = (-log_alpha.exp() * (lp.detach() - act_dim)).mean()
            alpha_opt.zero_grad()
            alpha_loss.backward()
            alpha_opt.step()
            with torch.no_grad():
                for p, pt in zip(list(qf1.parameters()) + list(qf2.parameters()),
                                 list(qf1_t.parameters()) + list(qf2_t.parameters())):
                    pt.lerp_(p, 0.005)
    return (steps - warmup - 500) / (time.time() - t_start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--skip-sac", action="store_true")
    a = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for name, script, extra in [("IQ", "iq_continuous.py", []), ("M-IQ", "miq_continuous.py", [])]:
        results[name] = script_sps(script, a.steps, a.warmup, extra)
        print(f"{name:6s} {script:20s} steady-state SPS on Hopper-v5: {results[name]:7.1f}", flush=True)
    if not a.skip_sac:
        sac = sac_reference_sps(a.steps, a.warmup)
        print(f"SAC    reference loop       steady-state SPS on Hopper-v5: {sac:7.1f}")
        for name in ["IQ", "M-IQ"]:
            print(f"{name} / SAC = {results[name] / sac:.2f}x (target >= 1.5x)")
