"""One update of our X-SAC and SAC (xql_sac.py) beside the authors' GumbelSAC (github.com/Div99/XQL,
online/research/algs/gumbel_sac.py), from the same weights, on the same batch, with the same noise.

Their learner is built from their own classes in their clone (--authors-repo PATH or
$XQL_AUTHORS_REPO; nothing of theirs is copied here), with orthogonal initialisation as their
config has it; its weights are then copied into our networks. Both take one step on one batch, the
reparameterisation noise of the policy sample fixed to the same draw (torch's Normal.rsample is
patched while each side runs), and we compare every loss, the critics' and V's regression targets,
and every parameter afterwards (the four networks, V's Polyak average and the temperature).

Their options are set to ours where the two differ by setting: one actor and temperature update
per step and V's Polyak average every step (theirs: every 2 steps; ours by default: 2 actor
updates every 2 steps, so we set policy_frequency 1), our learning rates on their Adam param
groups, the same initial temperature and clip. What differs by design, the clip of the Gumbel
residual z (ours from above only, theirs on both sides), is shown on two batches: one where no z
passes the clip (the two agree) and one where V sits far above its targets (z below -c: their
clip zeroes those samples' gradient, ours does not).

    python benchmarks/parity/xql_online_update.py --authors-repo /tmp/XQL
"""

import argparse
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OBS_DIM, ACT_DIM, HIDDEN, BATCH = 24, 6, 256, 256  # walker-run's sizes, our networks and batch


def load_ours(name: str = "xql_sac"):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_theirs(repo: str | None):
    repo = repo or os.environ.get("XQL_AUTHORS_REPO")
    if not repo or not os.path.isdir(os.path.join(repo, "online", "research")):
        raise SystemExit(f"error: give a clone of github.com/Div99/XQL with --authors-repo or XQL_AUTHORS_REPO (got {repo!r})")
    sys.path.insert(0, os.path.join(os.path.abspath(repo), "online"))
    import research.algs.gumbel_sac as gumbel_sac  # noqa: E402
    import research.algs.gumbel_td3 as gumbel_td3  # noqa: E402
    from research.networks import ActorCriticPolicy, ActorCriticValuePolicy  # noqa: E402

    return gumbel_sac, ActorCriticValuePolicy, gumbel_td3, ActorCriticPolicy


class Spaces:
    """The two spaces their learner reads from an env."""

    def __init__(self):
        import gym

        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)


@contextmanager
def fixed_noise(eps: torch.Tensor):
    """Every Normal.rsample returns loc + scale * eps while inside."""
    original = torch.distributions.Normal.rsample
    torch.distributions.Normal.rsample = lambda self, sample_shape=(): self.loc + self.scale * eps
    try:
        yield
    finally:
        torch.distributions.Normal.rsample = original


@contextmanager
def recording(module, names: list[str], calls: dict):
    """Record the (pred, target) of each call to module.<name> while inside."""
    originals = {n: getattr(module, n) for n in names}

    def recorder(name):
        def call(pred, label, *args, **kwargs):
            calls.setdefault(name, []).append((pred.detach().clone(), label.detach().clone()))
            return originals[name](pred, label, *args, **kwargs)

        return call

    for n in names:
        setattr(module, n, recorder(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(module, n, f)


def linear_layers(seq: torch.nn.Sequential) -> list:
    return [m for m in seq if hasattr(m, "weight")]


def copy_theirs_into_ours(theirs, ours: dict) -> None:
    """Their actor, ensemble critic, V and V's target into our actor, qf1, qf2, vf, vf_target."""
    with torch.no_grad():
        pairs = [(theirs.network.actor.mlp.net, ours["actor"].net), (theirs.network.value.mlp.net, ours["vf"].net)]
        pairs.append((theirs.target_network.value.mlp.net, ours["vf_target"].net))
        for src, dst in pairs:
            for a, b in zip(linear_layers(src), linear_layers(dst)):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
        for i, qf in enumerate((ours["qf1"], ours["qf2"])):  # their ensemble: weight (E, in, out), bias (E, 1, out)
            for a, b in zip(linear_layers(theirs.network.critic.q.net), linear_layers(qf.net)):
                b.weight.copy_(a.weight[i].T)
                b.bias.copy_(a.bias[i, 0])
        ours["log_alpha"].copy_(theirs.log_alpha.detach().reshape(1))


def ours_params(ours: dict) -> dict:
    """Our parameters under names shared with `theirs_params`."""
    out = {}
    for name in ("actor", "vf", "vf_target", "qf1", "qf2"):
        for k, layer in enumerate(linear_layers(ours[name].net)):
            out[f"{name}.{k}.weight"], out[f"{name}.{k}.bias"] = layer.weight.detach(), layer.bias.detach()
    out["log_alpha"] = ours["log_alpha"].detach().reshape(())
    return out


def theirs_params(theirs) -> dict:
    out = {}
    nets = {"actor": theirs.network.actor.mlp.net, "vf": theirs.network.value.mlp.net}
    nets["vf_target"] = theirs.target_network.value.mlp.net
    for name, net in nets.items():
        for k, layer in enumerate(linear_layers(net)):
            out[f"{name}.{k}.weight"], out[f"{name}.{k}.bias"] = layer.weight.detach(), layer.bias.detach()
    for k, layer in enumerate(linear_layers(theirs.network.critic.q.net)):
        for i in range(2):
            out[f"qf{i + 1}.{k}.weight"] = layer.weight[i].T.detach()
            out[f"qf{i + 1}.{k}.bias"] = layer.bias[i, 0].detach()
    out["log_alpha"] = theirs.log_alpha.detach().reshape(())
    return out


def one_update(case: str, gumbel_sac, policy_class, repo_args: dict, v_bias: float = 0.0, seed: int = 0) -> dict:
    """Both learners from the same weights, one step on one batch; the largest absolute difference
    of each compared quantity."""
    xql_sac = load_ours()
    sac = case == "SAC"
    args = xql_sac.Args(value_loss="sac" if sac else "gumbel", beta=2.0, policy_frequency=1,
                        target_network_frequency=1, alpha=0.1, batch_size=BATCH, hidden_size=HIDDEN)
    torch.manual_seed(seed)
    net_kwargs = dict(
        actor_class="DiagonalGaussianMLPActor", critic_class="ContinuousMLPCritic", value_class="MLPValue",
        actor_kwargs=dict(hidden_layers=[HIDDEN, HIDDEN], log_std_bounds=[-5, 2]),
        critic_kwargs=dict(hidden_layers=[HIDDEN, HIDDEN], num_q_fns=2),
        value_kwargs=dict(hidden_layers=[HIDDEN, HIDDEN]), ortho_init=True,
    )
    theirs = gumbel_sac.GumbelSAC(
        Spaces(), policy_class, None, network_kwargs=net_kwargs, device="cpu", optim_kwargs={"lr": args.q_lr},
        tau=args.lam, init_temperature=args.alpha, actor_freq=1, target_freq=1, init_steps=0,
        exp_clip=args.exp_clip, beta=args.beta, loss="mse" if sac else "gumbel_rescale", use_value_log_prob=sac,
        **repo_args,
    )
    for name, optim in theirs.optim.items():  # our learning rates: the actor's, and one for the rest
        for group in optim.param_groups:
            group["lr"] = args.policy_lr if name == "actor" else args.q_lr
    with torch.no_grad():
        for net in (theirs.network.value, theirs.target_network.value):  # V above its targets: z << 0
            linear_layers(net.mlp.net)[-1].bias.add_(v_bias)
    theirs._steps, theirs._env_steps = 0, 10**9
    theirs._step_env = lambda: {}  # the harness gives the batch; no env is stepped

    actor = xql_sac.Actor(OBS_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), HIDDEN)
    ours = dict(actor=actor, qf1=xql_sac.Critic(OBS_DIM + ACT_DIM, HIDDEN),
                qf2=xql_sac.Critic(OBS_DIM + ACT_DIM, HIDDEN), vf=xql_sac.Critic(OBS_DIM, HIDDEN),
                vf_target=xql_sac.Critic(OBS_DIM, HIDDEN), log_alpha=torch.zeros(1))
    copy_theirs_into_ours(theirs, ours)
    ours["log_alpha"].requires_grad_()
    # as our train() builds them
    ours["q_optimizer"] = torch.optim.Adam([*ours["qf1"].parameters(), *ours["qf2"].parameters()], lr=args.q_lr, fused=True)
    ours["v_optimizer"] = torch.optim.Adam(ours["vf"].parameters(), lr=args.q_lr, fused=True)
    ours["actor_optimizer"] = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    ours["a_optimizer"] = torch.optim.Adam([ours["log_alpha"]], lr=args.q_lr, fused=True)
    before = {k: v.clone() for k, v in ours_params(ours).items()}
    assert max((before[k] - v).abs().max().item() for k, v in theirs_params(theirs).items()) == 0.0

    g = torch.Generator().manual_seed(seed + 1)
    obs, next_obs = torch.randn(BATCH, OBS_DIM, generator=g), torch.randn(BATCH, OBS_DIM, generator=g)
    actions = torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1
    rewards = torch.rand(BATCH, generator=g)
    dones = (torch.rand(BATCH, generator=g) < 0.1).float()
    eps = torch.randn(BATCH, ACT_DIM, generator=g)

    with fixed_noise(eps):
        logs = xql_sac.update((obs, actions, rewards, next_obs, dones), ours, args, -float(ACT_DIM), 0)
    calls = {}
    batch = dict(obs=obs, action=actions, reward=rewards, next_obs=next_obs, discount=args.gamma * (1 - dones))
    with fixed_noise(eps), recording(torch.nn.functional, ["mse_loss"], calls):
        with recording(gumbel_sac, ["gumbel_rescale_loss", "mse_loss"], calls):
            metrics = theirs._train_step(batch)
    value_call = calls["mse_loss" if sac else "gumbel_rescale_loss"][-1]
    diffs = {
        "critic target y": (logs["q_target"] - calls["mse_loss"][0][1]).abs().max().item(),
        "value target": (logs["v_target"] - value_call[1]).abs().max().item(),
        "critic loss (sum of both)": abs((logs["qf1_loss"] + logs["qf2_loss"]).item() - metrics["q_loss"]),
        "value loss": abs(logs["value_loss"].item() - metrics["value_loss"]),
        "actor loss": abs(logs["actor_loss"].item() - metrics["actor_loss"]),
        "temperature loss": abs(logs["alpha_loss"].item() - metrics["alpha_loss"]),
    }
    after_ours, after_theirs = ours_params(ours), theirs_params(theirs)
    groups = {"actor": "actor", "critics": "qf", "V": "vf.", "V's Polyak average": "vf_target", "log alpha": "log_alpha"}
    for label, prefix in groups.items():
        keys = [k for k in after_ours if k.startswith(prefix)]
        diffs[f"{label} parameters after the step"] = max((after_ours[k] - after_theirs[k]).abs().max().item() for k in keys)
        moved = max((after_ours[k] - before[k]).abs().max().item() for k in keys)
        diffs[f"{label} parameters after the step"] = (diffs[f"{label} parameters after the step"], moved)
    z = (logs["v_target"] - logs["v"]) / args.beta
    return {"diffs": diffs, "z_range": (z.min().item(), z.max().item())}


def one_td3_update(case: str, gumbel_td3, policy_class, q_bias: float = 0.0, seed: int = 0) -> dict:
    """X-TD3 or TD3: both learners from the same weights, one step (critics, actor, Polyak targets:
    theirs at actor_freq = target_freq = 2, ours at policy_frequency 2, so step 0 does all three),
    the target-smoothing noise the same draw (torch seeded alike before each side)."""
    xql_td3 = load_ours("xql_td3")
    mse = case == "TD3"
    args = xql_td3.Args(critic_loss="mse" if mse else "gumbel", beta=2.0, batch_size=BATCH, hidden_size=HIDDEN)
    torch.manual_seed(seed)
    net_kwargs = dict(
        actor_class="ContinuousMLPActor", critic_class="ContinuousMLPCritic",
        actor_kwargs=dict(hidden_layers=[HIDDEN, HIDDEN], output_act=torch.nn.Tanh),
        critic_kwargs=dict(hidden_layers=[HIDDEN, HIDDEN], num_q_fns=2), ortho_init=True,
    )
    theirs = gumbel_td3.GumbelTD3(
        Spaces(), policy_class, None, network_kwargs=net_kwargs, device="cpu",
        optim_kwargs={"lr": args.learning_rate}, tau=args.lam, target_noise=args.policy_noise,
        noise_clip=args.noise_clip, actor_freq=args.policy_frequency, target_freq=args.policy_frequency,
        init_steps=0, loss="mse" if mse else "gumbel_rescale", beta=args.beta, exp_clip=args.exp_clip,
    )
    with torch.no_grad():  # the online critics far above their targets: z << 0
        linear_layers(theirs.network.critic.q.net)[-1].bias.add_(q_bias)
    theirs._steps, theirs._env_steps = 0, 10**9
    theirs._step_env = lambda: {}
    low, high = -np.ones(ACT_DIM, dtype=np.float32), np.ones(ACT_DIM, dtype=np.float32)
    ours = dict(actor=xql_td3.Actor(OBS_DIM, low, high, HIDDEN), actor_target=xql_td3.Actor(OBS_DIM, low, high, HIDDEN))
    for key in ("qf1", "qf2", "qf1_target", "qf2_target"):
        ours[key] = xql_td3.Critic(OBS_DIM + ACT_DIM, HIDDEN)
    with torch.no_grad():
        for src, dst in [(theirs.network, ""), (theirs.target_network, "_target")]:
            for a, b in zip(linear_layers(src.actor.mlp.net), linear_layers(ours["actor" + dst].net)):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            for i in range(2):
                for a, b in zip(linear_layers(src.critic.q.net), linear_layers(ours[f"qf{i + 1}{dst}"].net)):
                    b.weight.copy_(a.weight[i].T)
                    b.bias.copy_(a.bias[i, 0])
    q_params = [p for k in ("qf1", "qf2") for p in ours[k].parameters()]
    ours["q_optimizer"] = torch.optim.Adam(q_params, lr=args.learning_rate, fused=True)
    ours["actor_optimizer"] = torch.optim.Adam(ours["actor"].parameters(), lr=args.learning_rate, fused=True)

    def params(side: str) -> dict:
        out = {}
        for dst in ("", "_target"):
            if side == "ours":
                nets = {"actor": ours["actor" + dst].net, "qf1": ours["qf1" + dst].net, "qf2": ours["qf2" + dst].net}
                for name, net in nets.items():
                    for k, layer in enumerate(linear_layers(net)):
                        out[f"{name}{dst}.{k}.w"], out[f"{name}{dst}.{k}.b"] = layer.weight.detach(), layer.bias.detach()
            else:
                net = theirs.network if dst == "" else theirs.target_network
                for k, layer in enumerate(linear_layers(net.actor.mlp.net)):
                    out[f"actor{dst}.{k}.w"], out[f"actor{dst}.{k}.b"] = layer.weight.detach(), layer.bias.detach()
                for k, layer in enumerate(linear_layers(net.critic.q.net)):
                    for i in range(2):
                        out[f"qf{i + 1}{dst}.{k}.w"] = layer.weight[i].T.detach()
                        out[f"qf{i + 1}{dst}.{k}.b"] = layer.bias[i, 0].detach()
        return {k: v.clone() for k, v in out.items()}

    before = params("ours")
    assert max((before[k] - v).abs().max().item() for k, v in params("theirs").items()) == 0.0
    g = torch.Generator().manual_seed(seed + 1)
    obs, next_obs = torch.randn(BATCH, OBS_DIM, generator=g), torch.randn(BATCH, OBS_DIM, generator=g)
    actions = torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1
    rewards = torch.rand(BATCH, generator=g)
    dones = (torch.rand(BATCH, generator=g) < 0.1).float()
    bounds = (torch.as_tensor(low), torch.as_tensor(high))
    torch.manual_seed(seed + 2)
    logs = xql_td3.update((obs, actions, rewards, next_obs, dones), ours, args, bounds, 0)
    calls = {}
    batch = dict(obs=obs, action=actions, reward=rewards, next_obs=next_obs, discount=args.gamma * (1 - dones))
    torch.manual_seed(seed + 2)
    with recording(torch.nn.functional, ["mse_loss"], calls), recording(gumbel_td3, ["gumbel_rescale_loss"], calls):
        metrics = theirs._train_step(batch)
    theirs_y = calls["mse_loss" if mse else "gumbel_rescale_loss"][0][1]
    diffs = {
        "critic target y": (logs["y"] - theirs_y).abs().max().item(),
        "critic loss (sum of both)": abs(logs["q_loss"].item() - metrics["q_loss"]),
        "actor loss": abs(logs["actor_loss"].item() - metrics["actor_loss"]),
    }
    after_ours, after_theirs = params("ours"), params("theirs")
    for label, prefix in {"actor": "actor.", "critics": "qf", "targets (Polyak)": None}.items():
        keys = [k for k in after_ours if (k.split(".")[0].endswith("_target") if prefix is None
                                          else k.startswith(prefix) and "_target" not in k)]
        diff = max((after_ours[k] - after_theirs[k]).abs().max().item() for k in keys)
        moved = max((after_ours[k] - before[k]).abs().max().item() for k in keys)
        diffs[f"{label} parameters after the step"] = (diff, moved)
    z = (logs["y"] - logs["q_values"][0]) / args.beta
    return {"diffs": diffs, "z_range": (z.min().item(), z.max().item())}


def print_table(title: str, cases: dict) -> None:
    names = list(next(iter(cases.values()))["diffs"])
    print(f"\n{title}\n")
    print("| quantity | " + " | ".join(cases) + " |")
    print("| --- |" + " --- |" * len(cases))
    for name in names:
        cells = []
        for result in cases.values():
            d = result["diffs"].get(name, float("nan"))
            cells.append(f"{d[0]:.1e} (moved {d[1]:.1e})" if isinstance(d, tuple) else f"{d:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    ranges = " | ".join(f"{r['z_range'][0]:.1f} to {r['z_range'][1]:.1f}" for r in cases.values())
    print(f"| z = (target - prediction)/beta, min to max | {ranges} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", default=None)
    opts = p.parse_args(argv)
    gumbel_sac, value_policy, gumbel_td3, policy = load_theirs(opts.authors_repo)
    torch.set_num_threads(1)
    sac = {
        "X-SAC, no z past the clip": one_update("X-SAC", gumbel_sac, value_policy, {}),
        "X-SAC, V 30 above its targets (z < -8)": one_update("X-SAC", gumbel_sac, value_policy, {}, v_bias=60.0),
        "SAC (theirs: loss mse, use_value_log_prob)": one_update("SAC", gumbel_sac, value_policy, {}),
    }
    td3 = {
        "X-TD3, no z past the clip": one_td3_update("X-TD3", gumbel_td3, policy),
        "X-TD3, Q 30 above its targets (z < -8)": one_td3_update("X-TD3", gumbel_td3, policy, q_bias=60.0),
        "TD3 (theirs: loss mse)": one_td3_update("TD3", gumbel_td3, policy),
    }
    print_table("Largest absolute difference, ours - theirs: xql_sac.py against GumbelSAC", sac)
    print_table("Largest absolute difference, ours - theirs: xql_td3.py against GumbelTD3", td3)
    return {"sac": sac, "td3": td3}

if __name__ == "__main__":
    main()
