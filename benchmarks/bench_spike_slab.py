"""Spike-and-slab EM-SGHMC: cost against plain SGD, the sparse teacher, Boston, MNIST
LeNet-5, and chains in processes.

Suites (``python -m benchmarks.run SUITE``):

- ``spike-slab-speed``: seconds per epoch against plain PyTorch SGD with momentum on the same
  network and batches (interleaved epoch by epoch), the sampler's state against the parameter count,
  and the cost of a gradient through a Pyro trace against the kernel's plain-torch gradient.
- ``spike-slab-teacher``: the sparse teacher (1000 inputs, 10 relevant, net 1000-5-3-1) with the first
  layer grouped by inputs.
- ``spike-slab-boston``: the UCI protocol on all 20 Boston splits.
- ``spike-slab-mnist``: LeNet-5 on MNIST train5k -> t10k against plain Adam (and SGD) trained on the
  same batches in the same run.
- ``spike-slab-chains``: two chains in processes (``mp_context="spawn"``) against the same two chains
  run one after the other.

The state figure is the size of the tensors the kernel keeps between steps (``SGHMC.state_bytes``:
weights, momentum, one preconditioner tensor, the per-group EM vectors); the optimiser state is all
of it but the weights (plain SGD with momentum: one momentum buffer, 1x). It is a count of held
tensors, not an allocator measurement (this CPU machine has no allocator statistics;
``torch.cuda.max_memory_allocated`` would give one on a GPU).
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import pyro.infer.mcmc.api as mcmc_api
import pyro.poutine as poutine
import torch
from pyro.ops.stats import split_gelman_rubin

import bnnzoo
from bnnzoo import metrics
from bnnzoo.data import load_dataset, load_uci, make_sparse_teacher
from bnnzoo.guides import SGHMC
from bnnzoo.guides.training import set_seed
from bnnzoo.models.standardizer import Standardizer

from .harness import PlainTorch, epoch_ratio, fit_with_baseline, uci_protocol

NAME = "spike-slab-sghmc"

TEACHER_OPTIONS = {"first_layer": "inputs", "spike_scale": 0.02, "slab_scale": 1.0, "epochs": 120, "batch_size": 128,
                   "cycles": 4, "samples_per_cycle": 4, "thinning": 2, "em_start": 0.05, "prune_start": 10,
                   "lr": 1e-3}
MNIST_OPTIONS: dict = {}  # the catalog's classification defaults
MNIST_NUM_SAMPLES = 4  # LeNet-5 on 10,000 test images is slow on this CPU: few draws


def _state(posterior) -> dict:
    """The kernel's state between steps, in bytes and against the parameters' bytes."""
    size = posterior.history.extra["state_bytes"]
    params = sum(v[0, 0].numel() * v.element_size() for v in posterior.samples.values())
    return {"parameter_bytes": params, **size,
            "optimiser_state_over_parameters": (size["momentum"] + size["preconditioner"] + size["em"]) / params,
            "state_with_weights_over_parameters": sum(size.values()) / params,
            "plain_sgd_optimiser_state_over_parameters": 1.0}


def _pyro_trace_overhead(posterior, x, y, batch_size: int, repeats: int = 100) -> dict:
    """Seconds per gradient of the potential's likelihood part: the kernel's plain-torch path
    (``SGHMC.minibatch_gradient``) against tracing the conditioned Pyro model (``log_prob_sum`` of
    the trace, then a backward pass), at a stored draw."""
    model = posterior.model
    params = {s: v[0, -1].clone() for s, v in posterior.samples.items()}
    kernel = SGHMC(model, batch_size=batch_size)
    kernel.initial_params = params
    kernel.setup(0, x, y)
    xb, yb = x[:batch_size], y[:batch_size]
    n = len(x)
    leaves = {s: v.clone().requires_grad_() for s, v in params.items()}
    gammas = {f"{lay.layer}.gamma": torch.ones(lay.num_groups, device=x.device) for lay in model.prior.layouts}
    conditioned = poutine.condition(model, data={**leaves, **gammas, "pi": torch.tensor(0.5, device=x.device)})

    def traced():
        log_joint = poutine.trace(conditioned).get_trace(xb, yb, num_data=n).log_prob_sum()
        torch.autograd.grad(-log_joint, list(leaves.values()))

    def timed(fn) -> float:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        fn()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    paths = {"plain_torch": lambda: kernel.minibatch_gradient(xb, yb), "pyro_trace": traced}
    times = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(repeats):  # alternate the two, so that both see the same machine load
        for name, fn in paths.items():
            times[name].append(timed(fn))
    out = {f"{name}_seconds_per_gradient": statistics.median(t) for name, t in times.items()}
    out["pyro_trace_over_plain_torch"] = out["pyro_trace_seconds_per_gradient"] / out["plain_torch_seconds_per_gradient"]
    return out


def _speed_case(data, network, batch_size, epochs, device, **options) -> dict:
    posterior, plain = fit_with_baseline(NAME, data, device=device, seed=0, baseline="sgd", baseline_lr=1e-2,
                                         network=network, epochs=epochs, batch_size=batch_size, **options)
    std = posterior.standardizer
    x = std.x(data.x_train.to(posterior.device))
    y = std.y(data.y_train.to(posterior.device))
    return {"network": repr(posterior.net), "batch_size": batch_size, "epochs": epochs,
            "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
            "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
            "plain_sgd_seconds_per_epoch": statistics.median(plain.epoch_seconds[1:]),
            "state": _state(posterior), "sparsity": posterior.sparsity()["architecture"],
            **_pyro_trace_overhead(posterior, x, y, batch_size)}


def speed(device) -> dict:
    boston = _speed_case(load_uci("boston", split=0), None, 32, 200, device, cycles=2, samples_per_cycle=2)
    lenet = _speed_case(load_dataset("mnist"), {"arch": "lenet5"}, 128, 5, device, cycles=2, samples_per_cycle=1,
                        **MNIST_OPTIONS)
    cases = {"boston-mlp": boston, "mnist-lenet5": lenet}
    worst = max(c["epoch_time_ratio"] for c in cases.values())
    state = max(c["state"]["optimiser_state_over_parameters"] for c in cases.values())
    total = max(c["state"]["state_with_weights_over_parameters"] for c in cases.values())
    headline = (f"epoch time vs plain SGD+momentum: {boston['epoch_time_ratio']:.2f}x (13-50-1, batch 32), "
                f"{lenet['epoch_time_ratio']:.2f}x (LeNet-5, batch 128); optimiser state {state:.2f}x the "
                f"parameters (SGD 1x), {total:.2f}x with the weights; a Pyro-traced gradient costs "
                f"{boston['pyro_trace_over_plain_torch']:.1f}x / {lenet['pyro_trace_over_plain_torch']:.1f}x the kernel's")
    return {"spike-slab-speed": {"model": NAME, "dataset": "boston split 0; mnist train5k", "cases": cases,
                                 "epoch_time_ratio": worst, "headline": headline}}


def teacher(device) -> dict:
    data = make_sparse_teacher()
    posterior, plain = fit_with_baseline(NAME, data, device=device, seed=0, baseline="sgd", baseline_lr=1e-2,
                                         **TEACHER_OPTIONS)
    pred = posterior.predict(data.x_test, num_samples=posterior.num_draws)
    mse = float(((pred.mean - data.y_test.to(posterior.device)) ** 2).mean())
    sp = posterior.sparsity()
    inputs_kept = posterior.masks()["fc1.weight"].any(0).cpu()
    relevant = data.relevant_features
    noise_var = data.meta["noise_var"]
    result = {
        "model": NAME, "dataset": "sparse teacher 1000-5-3-1 (10 relevant inputs)", "options": TEACHER_OPTIONS,
        "test_mse": mse, "noise_var": noise_var, "mse_over_noise_var": mse / noise_var,
        "weights_pruned_fraction": sp["weights_pruned_fraction"], "weights_kept": sp["weights_kept"],
        "weights": sp["weights"], "architecture": sp["architecture"],
        "relevant_inputs_kept": int(inputs_kept[relevant].sum()), "relevant_inputs": len(relevant),
        "inputs_kept": int(inputs_kept.sum()),
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
        "state": _state(posterior), "config": posterior.config,
    }
    result["headline"] = (f"{100 * sp['weights_pruned_fraction']:.2f}% of weights pruned ({sp['weights_kept']} of "
                          f"{sp['weights']} kept, counting a pruned input's weights), relevant inputs kept "
                          f"{result['relevant_inputs_kept']}/{len(relevant)}, inputs kept {result['inputs_kept']}, "
                          f"test MSE {mse:.3f} = {mse / noise_var:.3f}x the noise variance")
    return {"spike-slab-teacher": result}


def boston(device) -> dict:
    result = uci_protocol(NAME, "boston", device=device, baseline="sgd", baseline_lr=1e-2, num_samples=25)
    s = result["summary"]
    result["headline"] = (f"RMSE {s['rmse']['mean']:.2f} ± {s['rmse']['se']:.2f}, test LL "
                          f"{s['log_likelihood']['mean']:.2f} ± {s['log_likelihood']['se']:.2f}, "
                          f"{100 * s['hidden_groups_pruned_fraction']['mean']:.0f}% of hidden neurons "
                          f"({100 * s['weights_pruned_fraction']['mean']:.0f}% of weights) pruned, 20 splits; "
                          f"epoch time vs plain SGD+momentum")
    return {"spike-slab-boston": result}


def mnist(device) -> dict:
    data = load_dataset("mnist")
    posterior = bnnzoo.create(NAME, data.task, data.input_shape, data.output_dim, dataset=data.name,
                              network={"arch": "lenet5"}, device=device, seed=0, **MNIST_OPTIONS)
    std = Standardizer.from_data(data.x_train, data.y_train, data.task).to(posterior.device)
    x, y = std.x(data.x_train.to(posterior.device)), data.y_train.to(posterior.device)
    batch = posterior.config["train"]["batch_size"]
    adam = PlainTorch(posterior.net, x, y, data.task, batch, 1e-3, "adam", 0)
    sgd = PlainTorch(posterior.net, x, y, data.task, batch, 1e-2, "sgd", 0)

    def both(*_):
        adam.epoch()
        sgd.epoch()

    set_seed(0)
    start = time.perf_counter()
    posterior.fit(data.x_train, data.y_train, progress=True, callback=both)
    fit_seconds = time.perf_counter() - start
    num_samples = min(MNIST_NUM_SAMPLES, posterior.num_draws)
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    sp = posterior.sparsity()
    x_test, y_test = std.x(data.x_test.to(posterior.device)), data.y_test.to(posterior.device)
    plain = {name: {**metrics.classification_metrics(p.probs(x_test), y_test),
                    "seconds_per_epoch": statistics.median(p.epoch_seconds[1:])} for name, p in (("adam", adam), ("sgd", sgd))}
    result = {
        "model": NAME, "dataset": "mnist-train5k-t10k", "arch": "lenet5", "options": MNIST_OPTIONS, "metrics": m,
        "num_samples": num_samples, "stored_draws": posterior.num_draws,
        "weights_pruned_fraction": sp["weights_pruned_fraction"],
        "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
        "compression_ratio": sp["compression_ratio"], "architecture": sp["architecture"],
        "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
        "epochs": len(posterior.history.epoch_seconds), "fit_seconds": fit_seconds,
        "plain_adam": plain["adam"], "plain_sgd": plain["sgd"],
        "accuracy_minus_plain_adam": m["accuracy"] - plain["adam"]["accuracy"],
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, sgd.epoch_seconds),
        "epoch_time_ratio_vs_adam": epoch_ratio(posterior.history.epoch_seconds, adam.epoch_seconds),
        "state": _state(posterior), "config": posterior.config,
    }
    result["headline"] = (f"accuracy {100 * m['accuracy']:.2f}% (plain Adam {100 * plain['adam']['accuracy']:.2f}%, "
                          f"SGD {100 * plain['sgd']['accuracy']:.2f}%), ECE {m['ece']:.3f} (Adam "
                          f"{plain['adam']['ece']:.3f}), NLL {m['nll']:.3f}, {100 * sp['weights_pruned_fraction']:.1f}% "
                          f"of weights pruned ({sp['architecture']}), {num_samples} draws; epoch time vs plain SGD")
    return {"spike-slab-mnist-lenet5": result}


def chains(device) -> dict:
    """Two chains in processes and the same two chains in turn. On a machine with fewer free cores
    than chains ``MCMC`` runs chains in turn; the process path is forced here by letting it see
    four cores, so that it is exercised on any machine."""
    data = load_uci("boston", split=0)
    options = {"num_chains": 2, "epochs": 200, "cycles": 4, "samples_per_cycle": 3}
    out = {}
    for mode in ("processes", "in_turn"):
        start = time.perf_counter()
        if mode == "processes":
            with mock.patch.object(mcmc_api.mp, "cpu_count", return_value=4):
                posterior = bnnzoo.fit(NAME, data, seed=0, device=device, progress=False, mp_context="spawn",
                                       **options)
        else:
            posterior = bnnzoo.fit(NAME, data, seed=0, device=device, progress=False, **options)
        seconds = time.perf_counter() - start
        pred = posterior.predict(data.x_test, num_samples=posterior.num_draws, return_samples=True)
        f = pred.samples.squeeze(-1).reshape(2, -1, len(data.x_test))  # (chain, draw, test point)
        r_hat = split_gelman_rubin(f, chain_dim=0, sample_dim=1)
        out[mode] = {"wall_seconds": seconds, **posterior.evaluate(data.x_test, data.y_test,
                                                                    num_samples=posterior.num_draws),
                     "max_r_hat_predictions": float(r_hat.max()), "median_r_hat_predictions": float(r_hat.median()),
                     "hidden_neurons_kept_per_chain": [int(posterior.chain_masks["fc1.bias"][c].sum()) for c in range(2)]}
    headline = (f"2 chains in processes: {out['processes']['wall_seconds']:.0f} s, in turn "
                f"{out['in_turn']['wall_seconds']:.0f} s; RMSE {out['processes']['rmse']:.2f} / "
                f"{out['in_turn']['rmse']:.2f}; split R-hat of test predictions, median "
                f"{out['processes']['median_r_hat_predictions']:.2f}")
    return {"spike-slab-chains": {"model": NAME, "dataset": "boston split 0", "options": options, **out,
                                  "headline": headline}}


SUITES = {"spike-slab-speed": speed, "spike-slab-teacher": teacher, "spike-slab-boston": boston,
          "spike-slab-mnist": mnist, "spike-slab-chains": chains}
