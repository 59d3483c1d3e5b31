"""Steady-state SPS of the online continuous-control scripts against SAC and TD3 reference loops.

    python benchmarks/bench_sps.py                      # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_sps.py --only iq miq sac    # a subset
    python benchmarks/bench_sps.py --steps 12000        # longer measurement

Each script runs as a user would run it (a subprocess on Hopper-v5, default flags but a short
warm-up and no evaluation); its steady-state SPS is read from the wall-clock times TensorBoard
stores with the `charts/SPS` scalar, over the steps after the warm-up, so the fast random warm-up
and the start-up do not inflate it.

The SAC and TD3 references are CleanRL's `sac_continuous_action.py` and `td3_continuous_action.py`
training loops, written out below: the `cleanrl` package on this machine's registry (0.4.8)
predates gymnasium and cannot run CleanRL's current scripts. SAC: 256-256 actor and twin critics
with Polyak targets, autotuned temperature, batch 256, one critic and one actor update per env
step. TD3: 256-256 deterministic actor and twin critics, target smoothing, actor and targets
every 2 steps.
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
        cmd = [
            sys.executable,
            os.path.join(ROOT, script),
            "--env-id",
            "Hopper-v5",
            "--total-timesteps",
            str(steps),
            "--learning-starts",
            str(warmup),
            "--eval-frequency",
            str(10 * steps),
            "--eval-episodes",
            "1",
            *extra,
        ]
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
    B = {
        "o": torch.zeros(n, obs_dim),
        "a": torch.zeros(n, act_dim),
        "r": torch.zeros(n, 1),
        "o2": torch.zeros(n, obs_dim),
        "d": torch.zeros(n, 1),
    }
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
                for p, pt in zip(
                    list(qf1.parameters()) + list(qf2.parameters()), list(qf1_t.parameters()) + list(qf2_t.parameters())
                ):
                    pt.lerp_(p, 0.005)
    return (steps - warmup - 500) / (time.time() - t_start)


def td3_reference_sps(steps: int, warmup: int) -> float:
    """CleanRL-style TD3 on Hopper-v5: one env step + one critic update per step, actor every 2."""
    env = gym.make("Hopper-v5")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, o))

    actor, actor_t = mlp(obs_dim, act_dim), mlp(obs_dim, act_dim)
    qf1, qf2 = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    qf1_t, qf2_t = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    for net, tgt in [(actor, actor_t), (qf1, qf1_t), (qf2, qf2_t)]:
        tgt.load_state_dict(net.state_dict())
    q_opt = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=3e-4)
    a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    B = {
        "o": torch.zeros(steps, obs_dim),
        "a": torch.zeros(steps, act_dim),
        "r": torch.zeros(steps, 1),
        "o2": torch.zeros(steps, obs_dim),
        "d": torch.zeros(steps, 1),
    }
    o, _ = env.reset(seed=0)
    t_start = None
    for t in range(steps):
        if t == warmup + 500:
            t_start = time.time()
        if t < warmup:
            a = env.action_space.sample()
        else:
            with torch.no_grad():
                a = torch.tanh(actor(torch.as_tensor(o, dtype=torch.float32)[None]))[0]
                a = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1).numpy()
        o2, r, term, trunc, _ = env.step(a)
        for k, v in zip("o a r o2 d".split(), [o, a, r, o2, term]):
            B[k][t] = torch.as_tensor(np.asarray(v, dtype=np.float32))
        o = env.reset()[0] if term or trunc else o2
        if t >= warmup:
            i = torch.randint(0, t + 1, (256,))
            bo, ba, br, bo2, bd = (B[k][i] for k in "o a r o2 d".split())
            with torch.no_grad():
                noise = (torch.randn_like(ba) * 0.2).clamp(-0.5, 0.5)
                a2 = (torch.tanh(actor_t(bo2)) + noise).clamp(-1, 1)
                x2 = torch.cat([bo2, a2], 1)
                y = br + 0.99 * (1 - bd) * torch.min(qf1_t(x2), qf2_t(x2))
            x = torch.cat([bo, ba], 1)
            q_loss = (qf1(x) - y).pow(2).mean() + (qf2(x) - y).pow(2).mean()
            q_opt.zero_grad()
            q_loss.backward()
            q_opt.step()
            if t % 2 == 0:
                a_loss = -qf1(torch.cat([bo, torch.tanh(actor(bo))], 1)).mean()
                a_opt.zero_grad()
                a_loss.backward()
                a_opt.step()
                with torch.no_grad():
                    for net, tgt in [(actor, actor_t), (qf1, qf1_t), (qf2, qf2_t)]:
                        for p, pt in zip(net.parameters(), tgt.parameters()):
                            pt.lerp_(p, 0.005)
    return (steps - warmup - 500) / (time.time() - t_start)


SCRIPTS = {
    "iq": ("IQ", "iq_continuous.py", []),
    "miq": ("M-IQ", "miq_continuous.py", []),
    "xsac": ("X-SAC", "xql_sac.py", []),
    "xsac-sac": ("X-SAC --value-loss sac", "xql_sac.py", ["--value-loss", "sac"]),
    "xtd3": ("X-TD3", "xql_td3.py", []),
    "xtd3-mse": ("X-TD3 --critic-loss mse", "xql_td3.py", ["--critic-loss", "mse"]),
}
TARGETS = {"iq": ("sac", 1.5), "miq": ("sac", 1.5), "xsac": ("sac", 0.8), "xtd3": ("td3", 1.0)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument(
        "--only", nargs="*", default=list(SCRIPTS) + ["sac", "td3"], choices=list(SCRIPTS) + ["sac", "td3"]
    )
    a = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Hopper-v5, {a.steps} steps, warm-up {a.warmup}, SPS measured after step {a.warmup + 500}"
    )
    results = {}
    for key in a.only:
        if key in SCRIPTS:
            name, script, extra = SCRIPTS[key]
            results[key] = script_sps(script, a.steps, a.warmup, extra)
        else:
            name = f"{key.upper()} reference loop (CleanRL's settings)"
            results[key] = (sac_reference_sps if key == "sac" else td3_reference_sps)(a.steps, a.warmup)
        print(f"{name:42s} steady-state SPS: {results[key]:7.1f}", flush=True)
    for key, (ref, target) in TARGETS.items():
        if key in results and ref in results:
            ratio = results[key] / results[ref]
            print(
                f"{SCRIPTS[key][0]} / {ref.upper()} = {ratio:.2f}x (target >= {target}x): "
                f"{'met' if ratio >= target else 'NOT met'}"
            )
