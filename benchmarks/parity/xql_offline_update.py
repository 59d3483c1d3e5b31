"""One update of our offline X-QL (xql_offline.py) beside the authors' own offline code
(github.com/Div99/XQL, offline/: JAX and flax), from the same weights, on the same batch.

Their `Learner` is built from their files in their clone (--authors-repo PATH or
$XQL_AUTHORS_REPO; nothing of theirs is copied here) and its flax parameters are converted into our
torch networks (a Dense kernel is a Linear weight transposed). Both take one step on one batch of
256, and we compare the V, policy and critic losses, the AWR weights, the critics' target and every
parameter afterwards (policy, V with its layer norms, both critics and their Polyak averages).

Their code needs, on today's packages (SHIMS, also printed): jax.tree_multimap (removed) aliased to
jax.tree_util.tree_map; flax's init returning a FrozenDict (`flax_return_frozendict`), which their
`variables.pop('params')` unpacks; jax.jit given only the static_argnames its function has (their
policy.py names one it lacks, which jax now refuses); tensorflow-probability's JAX substrate from
tfp-nightly (the release, 0.25, fails to import with jax 0.10).

Their options are set to ours where they are options (batch, β, clip, η, learning rates, layer norm
on V, double Q, the cosine schedule's length). What differs by their code, not an option: the
critics' loss is a Huber loss (δ 20, times 1/2) where ours and the paper's is the squared error,
so their critic loss is half ours while every |TD error| is under 20 and Adam's step is the same;
flax's LayerNorm takes ε 1e-6 where torch's takes 1e-5 (the harness sets ours to 1e-6 for the
matched case and shows the default too). Their `--noise` (Gaussian noise on the data's actions in
V's target, on their halfcheetah-medium run) has no counterpart in ours: shown on its own.

    python benchmarks/parity/xql_offline_update.py --authors-repo /tmp/XQL
"""

import argparse
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OBS_DIM, ACT_DIM, HIDDEN, BATCH = 11, 3, 256, 256  # Hopper's sizes, our networks and batch
SHIMS = [
    "jax.tree_multimap = jax.tree_util.tree_map (removed from jax)",
    "flax.config.update('flax_return_frozendict', True): their Model.create unpacks variables.pop('params')",
    "jax.jit keeps only the static_argnames its function has (policy.py names 'distribution', which it lacks)",
    "tensorflow_probability from tfp-nightly: the 0.25 release's JAX substrate fails to import with jax 0.10",
]


def load_theirs(repo: str | None):
    repo = repo or os.environ.get("XQL_AUTHORS_REPO")
    if not repo or not os.path.isfile(os.path.join(repo, "offline", "learner.py")):
        raise SystemExit(f"error: give a clone of github.com/Div99/XQL with --authors-repo or XQL_AUTHORS_REPO (got {repo!r})")
    import flax
    import jax

    jax.tree_multimap = jax.tree_util.tree_map
    flax.config.update("flax_return_frozendict", True)
    jit = jax.jit

    def lenient_jit(fun=None, **kw):
        if fun is None:
            return lambda f: lenient_jit(f, **kw)
        names = kw.get("static_argnames")
        if names:
            names = [names] if isinstance(names, str) else names
            kw["static_argnames"] = tuple(n for n in names if n in inspect.signature(fun).parameters)
        return jit(fun, **kw)

    jax.jit = lenient_jit
    sys.path.insert(0, os.path.join(os.path.abspath(repo), "offline"))
    import common  # noqa: E402
    import learner  # noqa: E402

    return learner, common


def load_ours():
    spec = importlib.util.spec_from_file_location("xql_offline", ROOT / "xql_offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linears(seq) -> list:
    return [m for m in seq if isinstance(m, torch.nn.Linear)]


def norms(seq) -> list:
    return [m for m in seq if isinstance(m, torch.nn.LayerNorm)]


def dense_into(params, layers) -> None:
    """flax Dense_0, Dense_1, ... into torch Linear layers, in order."""
    for k, layer in enumerate(layers):
        layer.weight.copy_(torch.as_tensor(np.array(params[f"Dense_{k}"]["kernel"])).T)
        layer.bias.copy_(torch.as_tensor(np.array(params[f"Dense_{k}"]["bias"])))


def to_ours(theirs, ours: dict) -> None:
    with torch.no_grad():
        actor = theirs.actor.params
        dense_into(actor["MLP_0"], linears(ours["policy"].net)[:2])
        last = linears(ours["policy"].net)[2]
        last.weight.copy_(torch.as_tensor(np.array(actor["Dense_0"]["kernel"])).T)
        last.bias.copy_(torch.as_tensor(np.array(actor["Dense_0"]["bias"])))
        ours["policy"].log_std.copy_(torch.as_tensor(np.array(actor["log_stds"])))
        value = theirs.value.params["MLP_0"]
        dense_into(value, linears(ours["vf"].net))
        for k, norm in enumerate(norms(ours["vf"].net)):
            norm.weight.copy_(torch.as_tensor(np.array(value[f"LayerNorm_{k}"]["scale"])))
            norm.bias.copy_(torch.as_tensor(np.array(value[f"LayerNorm_{k}"]["bias"])))
        for side, suffix in [(theirs.critic, ""), (theirs.target_critic, "_target")]:
            for i in range(2):
                dense_into(side.params[f"Critic_{i}"]["MLP_0"], linears(ours[f"qf{i + 1}{suffix}"].net))


def params_of(theirs=None, ours=None) -> dict:
    """Every parameter under one name, from either side, as numpy (torch weights transposed back)."""
    out = {}
    if theirs is not None:
        import jax

        for name, tree in [("policy", theirs.actor.params), ("vf", theirs.value.params),
                           ("critics", theirs.critic.params), ("critics_target", theirs.target_critic.params)]:
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                out[name + "/" + "/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
        return out
    p = ours["policy"]
    for k, layer in enumerate(linears(p.net)):
        key = f"policy/MLP_0/Dense_{k}" if k < 2 else "policy/Dense_0"
        out[key + "/kernel"], out[key + "/bias"] = layer.weight.detach().numpy().T, layer.bias.detach().numpy()
    out["policy/log_stds"] = p.log_std.detach().numpy()
    for k, layer in enumerate(linears(ours["vf"].net)):
        out[f"vf/MLP_0/Dense_{k}/kernel"], out[f"vf/MLP_0/Dense_{k}/bias"] = layer.weight.detach().numpy().T, layer.bias.detach().numpy()
    for k, norm in enumerate(norms(ours["vf"].net)):
        out[f"vf/MLP_0/LayerNorm_{k}/scale"], out[f"vf/MLP_0/LayerNorm_{k}/bias"] = norm.weight.detach().numpy(), norm.bias.detach().numpy()
    for suffix, name in [("", "critics"), ("_target", "critics_target")]:
        for i in range(2):
            for k, layer in enumerate(linears(ours[f"qf{i + 1}{suffix}"].net)):
                key = f"{name}/Critic_{i}/MLP_0/Dense_{k}"
                out[key + "/kernel"], out[key + "/bias"] = layer.weight.detach().numpy().T, layer.bias.detach().numpy()
    return out


def one_update(learner, common, value_loss: str = "gumbel", ln_eps: float | None = 1e-6, noise: bool = False,
               v_bias: float = 0.0, their_huber: bool = False, seed: int = 0) -> dict:
    xql = load_ours()
    if their_huber:  # their critic loss in place of ours, to see what is left once it is the same
        def huber(x, delta=20.0):
            quadratic = x.abs().clamp(max=delta)
            return 0.5 * quadratic**2 + delta * (x.abs() - quadratic)

        xql.critic_loss = lambda q_values, y: sum(huber(q - y).mean() for q in q_values)
    args = xql.Args(value_loss=value_loss, batch_size=BATCH, hidden_size=HIDDEN, total_timesteps=100_000)
    # their absl flags, hashable as jax.jit needs a static argument to be
    their_args = type("Flags", (), dict(num_v_updates=1, sample_random_times=0, noise=noise, noise_std=0.1,
                                        log_loss=False, max_clip=args.exp_clip, grad_pen=False, lambda_gp=1.0))()
    obs0, act0 = np.zeros((1, OBS_DIM), np.float32), np.zeros((1, ACT_DIM), np.float32)
    theirs = learner.Learner(seed, obs0, act0, actor_lr=args.learning_rate, value_lr=args.learning_rate,
                             critic_lr=args.learning_rate, hidden_dims=(HIDDEN, HIDDEN), discount=args.gamma,
                             tau=args.lam, expectile=args.expectile, temperature=args.eta, layernorm=True,
                             max_steps=args.total_timesteps, loss_temp=args.beta, double_q=True,
                             vanilla=value_loss == "expectile", opt_decay_schedule="cosine", args=their_args)
    if v_bias:  # V far above its targets, or below
        import jax

        value = jax.tree_util.tree_map(lambda x: x, theirs.value.params)
        value = value.copy({"MLP_0": value["MLP_0"].copy({"Dense_2": {"bias": value["MLP_0"]["Dense_2"]["bias"] + v_bias,
                                                                      "kernel": value["MLP_0"]["Dense_2"]["kernel"]}})})
        theirs.value = theirs.value.replace(params=value)

    torch.manual_seed(seed)
    low, high = -np.ones(ACT_DIM, np.float32), np.ones(ACT_DIM, np.float32)
    ours = dict(policy=xql.GaussianPolicy(OBS_DIM, low, high, HIDDEN), vf=xql.Critic(OBS_DIM, HIDDEN, layer_norm=True))
    for key in ("qf1", "qf2", "qf1_target", "qf2_target"):
        ours[key] = xql.Critic(OBS_DIM + ACT_DIM, HIDDEN)
    if ln_eps is not None:
        for norm in norms(ours["vf"].net):
            norm.eps = ln_eps
    to_ours(theirs, ours)
    # as our train() builds them
    ours["v_optimizer"] = torch.optim.Adam(ours["vf"].parameters(), lr=args.learning_rate, fused=True)
    q_params = [p for k in ("qf1", "qf2") for p in ours[k].parameters()]
    ours["q_optimizer"] = torch.optim.Adam(q_params, lr=args.learning_rate, fused=True)
    ours["policy_optimizer"] = torch.optim.Adam(ours["policy"].parameters(), lr=args.learning_rate, fused=True)
    ours["policy_lr_schedule"] = torch.optim.lr_scheduler.CosineAnnealingLR(ours["policy_optimizer"], args.total_timesteps)
    before = {k: v.copy() for k, v in params_of(ours=ours).items()}
    start = params_of(theirs=theirs)
    assert max(np.abs(before[k] - start[k]).max() for k in start) == 0.0, "weights not copied alike"

    rng = np.random.default_rng(seed + 1)
    obs, next_obs = rng.standard_normal((BATCH, OBS_DIM), np.float32), rng.standard_normal((BATCH, OBS_DIM), np.float32)
    actions = rng.uniform(-0.95, 0.95, (BATCH, ACT_DIM)).astype(np.float32)
    rewards = rng.uniform(0, 3, BATCH).astype(np.float32)
    dones = (rng.uniform(size=BATCH) < 0.05).astype(np.float32)
    batch = tuple(torch.as_tensor(x) for x in (obs, actions, rewards, next_obs, dones))
    logs = xql.update(batch, ours, args)
    info = theirs.update(common.Batch(observations=obs, actions=actions, rewards=rewards, masks=1.0 - dones,
                                      next_observations=next_obs))
    their_weights = np.minimum(np.exp(np.asarray(info["adv"]) * args.eta), args.max_weight)
    their_y = rewards + args.gamma * (1.0 - dones) * np.asarray(theirs.value(next_obs))
    diffs = {
        "V loss": abs(logs["value_loss"].item() - float(info["value_loss"])),
        "AWR weights": np.abs(logs["weights"].numpy() - their_weights).max(),
        "policy loss": abs(logs["policy_loss"].item() - float(info["actor_loss"])),
        "critic target y": np.abs(logs["y"].numpy() - their_y).max(),
        "critic loss, ours - 2 x theirs (their Huber is (1/2) x^2 below 20)": abs(logs["q_loss"].item() * (1 + their_huber) - 2 * float(info["critic_loss"])),
    }
    after_ours, after_theirs = params_of(ours=ours), params_of(theirs=theirs)
    for label, prefix in [("policy", "policy/"), ("V", "vf/"), ("critics", "critics/"), ("critics' Polyak averages", "critics_target/")]:
        keys = [k for k in after_theirs if k.startswith(prefix)]
        diff = max(np.abs(after_ours[k] - after_theirs[k]).max() for k in keys)
        moved = max(np.abs(after_ours[k] - before[k]).max() for k in keys)
        diffs[f"{label} after the step"] = (float(diff), float(moved))
        off = sum(int((np.abs(after_ours[k] - after_theirs[k]) > 1e-6).sum()) for k in keys)
        diffs[f"{label}: share of parameters more than 1e-6 apart"] = off / sum(after_ours[k].size for k in keys)
    z = (logs["q_bar"] - logs["v"]) / args.beta
    return {"diffs": diffs, "z_range": (z.min().item(), z.max().item()), "their_critic_loss": float(info["critic_loss"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", default=None)
    opts = p.parse_args(argv)
    learner, common = load_theirs(opts.authors_repo)
    torch.set_num_threads(1)
    print("shims:\n  " + "\n  ".join(SHIMS))
    cases = {
        "X-QL": one_update(learner, common),
        "X-QL, their Huber critic loss in ours": one_update(learner, common, their_huber=True),
        "IQL (expectile)": one_update(learner, common, "expectile"),
        "X-QL, our LayerNorm eps 1e-5": one_update(learner, common, ln_eps=None),
        "X-QL, V 60 below (z past the clip, TD errors past 20)": one_update(learner, common, v_bias=-60.0),
        "X-QL, their --noise on": one_update(learner, common, noise=True),
    }
    names = list(next(iter(cases.values()))["diffs"])
    print("\n| quantity | " + " | ".join(cases) + " |")
    print("| --- |" + " --- |" * len(cases))
    for name in names:
        cells = []
        for result in cases.values():
            d = result["diffs"][name]
            cells.append(f"{d[0]:.1e} (moved {d[1]:.1e})" if isinstance(d, tuple) else f"{d:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    ranges = " | ".join(f"{r['z_range'][0]:.1f} to {r['z_range'][1]:.1f}" for r in cases.values())
    print(f"| z = (Q_bar - V)/beta, min to max | {ranges} |")
    return cases


if __name__ == "__main__":
    main()
