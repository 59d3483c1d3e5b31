"""Speed and memory of soft_dqn_atari.py on Breakout, against a CleanRL-style DQN loop.

    python benchmarks/bench_atari.py                # SPS of the script, memory of a full 1M buffer
    python benchmarks/bench_atari.py --reference    # also the CleanRL-style loop (needs opencv-python-headless)
    python benchmarks/bench_atari.py --a2c --reference --skip-dqn --skip-memory   # soft A2C vs a PPO loop

1. Steady-state SPS: the script runs as a user runs it (a subprocess, training every 4 steps,
   the soft entropy target), and SPS is read from the wall-clock times TensorBoard stores with
   `charts/SPS`, after the warm-up.
2. Peak memory with the default 1M-transition buffer: a subprocess fills the script's
   FrameReplayBuffer with 1M real Breakout frames (as a 1M-step run would, without the 1M steps),
   then samples batches and trains the Q-network on them; it reports its peak resident memory.
3. --reference: CleanRL's dqn_atari.py loop, written out here (the cleanrl package on this
   registry is 0.4.8 and predates gymnasium): gymnasium's ALE env with AtariPreprocessing
   (OpenCV resize) and a 4-frame stack, a replay of uint8 stacks and next-stacks, the same
   Nature CNN, Adam 1e-4, batch 32, a hard DQN step every 4 env steps.
4. --a2c: soft_a2c_atari.py's steady-state SPS with 16 envs; with --reference also CleanRL's
   ppo_atari.py loop with its default 8 envs (gymnasium SyncVectorEnv with OpenCV preprocessing,
   128-step rollouts, 4 epochs of 4 minibatches), written out here for the same reason.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_sps(steps: int, warmup: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "soft_dqn_atari.py"),
            "--env-id",
            "BreakoutNoFrameskip-v4",
            "--total-timesteps",
            str(steps),
            "--learning-starts",
            str(warmup),
            "--buffer-size",
            "200000",
            "--eval-frequency",
            str(10 * steps),
            "--eval-episodes",
            "1",
            "--max-episode-frames",
            "20000",
        ]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        (run,) = glob.glob(os.path.join(tmp, "runs", "*"))
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        events = [e for e in acc.Scalars("charts/SPS") if e.step >= warmup + 2000]
        return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


MEMORY_CHILD = """
import resource, time, numpy as np, torch, soft_dqn_atari as sd
env = sd.make_env("breakout", 1, 0, False, False)
obs, _ = env.reset(seed=0)
rb = sd.FrameReplayBuffer(1_000_000)
rng = np.random.default_rng(0)
rb.start_episode(obs[0])
t0 = time.time()
frames = []
for i in range(1000):  # 1000 real frames, written 1M times (the env would take ~20 minutes for 1M)
    obs, r, te, tr, _ = env.step(rng.integers(0, 4, 1))
    frames.append(obs[0, -1].copy())
for i in range(1_000_000):
    rb.add(int(i % 4), 0.0, False, i % 5000 == 4999, frames[i % 1000])
    if i % 5000 == 4999:
        rb.start_episode(np.stack([np.zeros((84, 84), np.uint8)] * 3 + [frames[i % 1000]]))
fill = time.time() - t0
q, qt = sd.QNetwork(4), sd.QNetwork(4)
opt = torch.optim.Adam(q.parameters(), lr=1e-4)
for _ in range(50):
    batch = {k: torch.as_tensor(v) for k, v in rb.sample(32, 3, rng).items()}
    with torch.no_grad():
        q_next = sd.target_q_next(qt, batch["next_obs"], batch["ends"], "entropy")
        y = sd.nstep_target(batch["rewards"], batch["dones"], batch["ends"], q_next, 0.99, 0.1, "entropy")
    loss = sd.td_loss(q(batch["obs"]).gather(1, batch["actions"].unsqueeze(1)).squeeze(1), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"{rb.nbytes / 1e9:.3f} {peak / 1e9:.3f} {fill:.1f}")
"""


def buffer_memory() -> tuple:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], cwd=ROOT, check=True, capture_output=True, text=True)
    nbytes, peak, fill = map(float, out.stdout.split()[-3:])
    return nbytes, peak, fill


def cleanrl_reference_sps(steps: int, warmup: int) -> float:
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("BreakoutNoFrameskip-v4")
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
    env = gym.wrappers.FrameStackObservation(env, 4)
    import soft_dqn_atari as sd

    n = env.action_space.n
    q, qt = sd.QNetwork(n), sd.QNetwork(n)
    qt.load_state_dict(q.state_dict())
    opt = torch.optim.Adam(q.parameters(), lr=1e-4)
    cap = steps
    obs_buf = np.zeros((cap, 4, 84, 84), np.uint8)
    next_buf = np.zeros((cap, 4, 84, 84), np.uint8)
    act_buf, rew_buf, done_buf = np.zeros(cap, np.int64), np.zeros(cap, np.float32), np.zeros(cap, np.float32)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    t_start = None
    for t in range(steps):
        if t == warmup + 2000:
            t_start = time.time()
        if t < warmup or rng.random() < 0.05:
            a = int(rng.integers(0, n))
        else:
            with torch.no_grad():
                a = int(q(torch.as_tensor(np.asarray(obs))[None]).argmax(1)[0])
        next_obs, r, te, tr, _ = env.step(a)
        obs_buf[t], next_buf[t], act_buf[t], rew_buf[t], done_buf[t] = obs, next_obs, a, np.sign(r), te
        obs = env.reset()[0] if te or tr else next_obs
        if t >= warmup and t % 4 == 0:
            i = rng.integers(0, t + 1, 32)
            with torch.no_grad():
                y = torch.as_tensor(rew_buf[i]) + 0.99 * qt(torch.as_tensor(next_buf[i])).max(1).values * (
                    1 - torch.as_tensor(done_buf[i])
                )
            qa = q(torch.as_tensor(obs_buf[i])).gather(1, torch.as_tensor(act_buf[i])[:, None]).squeeze(1)
            loss = torch.nn.functional.mse_loss(qa, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t % 1000 == 0:
                qt.load_state_dict(q.state_dict())
    return (steps - warmup - 2000) / (time.time() - t_start)


def a2c_sps(steps: int, num_envs: int = 16) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "soft_a2c_atari.py"),
            "--env-id",
            "BreakoutNoFrameskip-v4",
            "--num-envs",
            str(num_envs),
            "--total-timesteps",
            str(steps),
            "--eval-frequency",
            str(10 * steps),
            "--eval-episodes",
            "1",
            "--max-episode-frames",
            "20000",
            "--log-frequency",
            "10",
        ]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        (run,) = glob.glob(os.path.join(tmp, "runs", "*"))
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        events = [e for e in acc.Scalars("charts/SPS") if e.step >= steps // 5]
        return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def cleanrl_ppo_reference_sps(steps: int, num_envs: int = 8) -> float:
    """CleanRL's ppo_atari.py loop: 8 gymnasium ALE envs (SyncVectorEnv, OpenCV preprocessing, 4-stack),
    128-step rollouts, 4 epochs x 4 minibatches of the Nature-CNN actor-critic, Adam 2.5e-4."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    import soft_a2c_atari as sa

    def thunk():
        env = gym.make("BreakoutNoFrameskip-v4")
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
        return gym.wrappers.FrameStackObservation(env, 4)

    envs = gym.vector.SyncVectorEnv([thunk for _ in range(num_envs)])
    agent = sa.Agent(envs.single_action_space.n)
    opt = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    T = 128
    obs_buf = torch.zeros((T, num_envs, 4, 84, 84), dtype=torch.uint8)
    act_buf, logp_buf, rew_buf, val_buf = (torch.zeros((T, num_envs)) for _ in range(4))
    obs, _ = envs.reset(seed=0)
    obs = torch.as_tensor(obs)
    n_iter = steps // (T * num_envs)
    t_start, step_start = None, 0
    for it in range(n_iter):
        if it == 1:
            t_start, step_start = time.time(), it * T * num_envs
        for t in range(T):
            with torch.no_grad():
                logits, v = agent(obs)
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t] = obs, a, dist.log_prob(a), v
            nxt, r, te, tr, _ = envs.step(a.numpy())
            rew_buf[t] = torch.as_tensor(np.sign(r), dtype=torch.float32)
            obs = torch.as_tensor(nxt)
        returns = rew_buf + 0.99 * torch.cat([val_buf[1:], val_buf[-1:]])  # stand-in for GAE: same cost class
        b_obs, b_act, b_logp = obs_buf.flatten(0, 1), act_buf.flatten().long(), logp_buf.flatten()
        b_ret, b_adv = returns.flatten(), (returns - val_buf).flatten()
        for _ in range(4):
            perm = torch.randperm(T * num_envs)
            for mb in perm.split(T * num_envs // 4):
                logits, v = agent(b_obs[mb])
                logp = torch.log_softmax(logits, -1).gather(1, b_act[mb, None]).squeeze(1)
                ratio = (logp - b_logp[mb]).exp()
                pg = -torch.min(ratio * b_adv[mb], ratio.clamp(0.9, 1.1) * b_adv[mb]).mean()
                loss = pg + 0.5 * (v - b_ret[mb]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                opt.step()
    return (n_iter * T * num_envs - step_start) / (time.time() - t_start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=5000)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-dqn", action="store_true")
    parser.add_argument("--a2c", action="store_true", help="also soft_a2c_atari.py (16 envs) [vs PPO with --reference]")
    a = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads; Breakout, "
        f"{a.steps} steps, warm-up {a.warmup}, SPS after step {a.warmup + 2000}, a gradient step every 4 env steps"
    )
    if not a.skip_dqn:
        sps = script_sps(a.steps, a.warmup)
        print(f"soft_dqn_atari.py --target entropy        steady-state SPS: {sps:7.1f}", flush=True)
        if a.reference:
            ref = cleanrl_reference_sps(a.steps, a.warmup)
            print(f"CleanRL-style dqn_atari loop (hard target) steady-state SPS: {ref:7.1f}")
            print(f"ratio: {sps / ref:.2f}x (target >= 1x)", flush=True)
    if a.a2c:
        sps = a2c_sps(max(a.steps, 40000))
        print(f"soft_a2c_atari.py, 16 envs                 steady-state SPS: {sps:7.1f}", flush=True)
        if a.reference:
            ref = cleanrl_ppo_reference_sps(max(a.steps, 40000))
            print(f"CleanRL-style ppo_atari loop, 8 envs       steady-state SPS: {ref:7.1f}")
            print(f"ratio: {sps / ref:.2f}x (target >= 2x)", flush=True)
    if not a.skip_memory:
        nbytes, peak, fill = buffer_memory()
        print(
            f"default 1M buffer: {nbytes:.2f} GB allocated; peak RSS of a process holding it full and training: "
            f"{peak:.2f} GB (target <= 7.5 GB); filling took {fill:.0f} s"
        )
