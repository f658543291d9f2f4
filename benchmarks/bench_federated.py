"""Federated EM-TDAMP on Flower against centralised EM-TDAMP and FedAvg of Adam clients.

Every federated run is real: Flower's ServerApp and ClientApp in its Simulation Runtime (the
ServerApp in the benchmark process, the clients executed by Ray actors;
:func:`bnnzoo.federated.run.run_federated`); a round is ``local_epochs``
local passes over each client's data, then the server's aggregation and EM step (FedAvg: as many
local Adam epochs per client, then Flower's FedAvg aggregation). Centralised EM-TDAMP runs as many passes
as there are rounds, on the same split, seed and options (and, in ``federated-mnist-100``, as many
passes as the federated run's rounds hold data: 50 rounds of 10 of 100 clients, 5 passes).

Local passes per round: one on Boston housing (100 rounds). On MNIST a client's 500 examples are
four minibatches of 128, so 30 rounds of one local pass are only 120 sequential steps of the
averaged posterior (the centralised fit takes about 1,200 in its 30 passes) and the global posterior
is still moving at round 30; three local passes per round let it settle within the 30 rounds.
FedAvg runs with the same number of local epochs (the same local work per round) and, as a
second baseline, with one.

Suites: ``federated-boston`` (4 clients, IID, 100 rounds, test NMSE; the splits are
``BOSTON_SPLITS``), ``federated-mnist`` (MNIST train5k -> t10k, 10 clients, IID and label-skewed
Dirichlet(0.5), 30 rounds; test error, and the rounds each method needs to come within one point
of centralised EM-TDAMP), ``federated-mnist-100`` (MNIST train5k -> t10k, 100 simulated clients
label-skewed by Dirichlet(0.5), 10 sampled per round, 50 rounds: EM-TDAMP and FedAvg against
centralised EM-TDAMP of as many passes, the rounds each needs to come within one point of it, and
the wall time of each simulation; ``BNNZOO_FEDERATED_MNIST100_ROUNDS=N`` runs N rounds instead, a
reduced run that its result records).
"""

from __future__ import annotations

import os
import time

import bnnzoo
from bnnzoo.data import load_dataset, load_uci, uci_num_splits
from bnnzoo.federated.run import FEDERATED_BATCH_SIZE, quiet_flower, run_federated
from bnnzoo.guides.training import set_seed

from .harness import mean_se

KEEP = 0.4
BOSTON_ROUNDS = 100
BOSTON_CLIENTS = 4
BOSTON_LOCAL_EPOCHS = 1
# splits of the Boston benchmark: BNNZOO_FEDERATED_SPLITS=N runs the first N (default all 20)
BOSTON_SPLITS = int(os.environ.get("BNNZOO_FEDERATED_SPLITS", "0")) or None
MNIST_ROUNDS = 30
MNIST_FEDAVG_ROUNDS = 100
MNIST_CLIENTS = 10
MNIST_LOCAL_EPOCHS = 3
ALPHA = 0.5


def _nmse(posterior, data) -> float:
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=100)
    return m["rmse"] ** 2 / float(data.y_test.var())


def boston(device, splits: list[int] | None = None) -> dict:
    quiet_flower()
    n = uci_num_splits("boston")
    splits = list(range(BOSTON_SPLITS or n)) if splits is None else splits
    rows = []
    for split in splits:
        data = load_uci("boston", split=split)
        set_seed(split)
        central = bnnzoo.fit("em-tdamp", data, device=device, progress=False, seed=split, keep=KEEP,
                             epochs=BOSTON_ROUNDS, validation_fraction=None, batch_size=FEDERATED_BATCH_SIZE)
        fed = run_federated(data, num_clients=BOSTON_CLIENTS, rounds=BOSTON_ROUNDS, seed=split, device=device,
                            keep=KEEP, eval_every=10, local_epochs=BOSTON_LOCAL_EPOCHS)
        avg = run_federated(data, method="fedavg", num_clients=BOSTON_CLIENTS, rounds=BOSTON_ROUNDS, seed=split,
                            device=device, eval_every=10, local_epochs=BOSTON_LOCAL_EPOCHS)
        row = {"split": split, "central_nmse": _nmse(central, data), "federated_nmse": _nmse(fed.model, data),
               "fedavg_nmse": avg.history["nmse"][-1], "federated_seconds": fed.seconds,
               "fedavg_seconds": avg.seconds, "federated_curve": fed.history["nmse"],
               "fedavg_curve": avg.history["nmse"], "federated_architecture": fed.model.sparsity()["architecture"]}
        rows.append(row)
        print(f"  split {split}: NMSE central {row['central_nmse']:.3f}, federated {row['federated_nmse']:.3f}, "
              f"FedAvg {row['fedavg_nmse']:.3f} ({fed.seconds:.0f} s, {avg.seconds:.0f} s)", flush=True)
    summary = {k: mean_se([r[k] for r in rows]) for k in ("central_nmse", "federated_nmse", "fedavg_nmse",
                                                            "federated_seconds", "fedavg_seconds")}
    c, f, a = summary["central_nmse"]["mean"], summary["federated_nmse"]["mean"], summary["fedavg_nmse"]["mean"]
    gap = f / c - 1.0
    headline = (f"{BOSTON_CLIENTS} clients (IID), {BOSTON_ROUNDS} rounds of {BOSTON_LOCAL_EPOCHS} local pass, "
                f"{len(splits)} of {n} splits, "
                f"{100 * KEEP:.0f}% of hidden neurons kept: test NMSE federated EM-TDAMP {f:.3f} ± "
                f"{summary['federated_nmse']['se']:.3f} vs centralised {c:.3f} ± {summary['central_nmse']['se']:.3f} "
                f"({100 * gap:+.1f}%, target within 10%: {'met' if abs(gap) <= 0.10 else 'not met'}); "
                f"FedAvg of Adam clients {a:.3f} ± {summary['fedavg_nmse']['se']:.3f}")
    return {"federated-em-tdamp-boston": {"model": "federated em-tdamp vs fedavg", "dataset": "boston",
                                          "headline": headline, "splits": splits, "clients": BOSTON_CLIENTS,
                                          "rounds": BOSTON_ROUNDS, "local_epochs": BOSTON_LOCAL_EPOCHS, "keep": KEEP, "summary": summary,
                                          "relative_gap": gap, "per_split": rows}}


def _rounds_to(curve_rounds: list[int], errors: list[float], target: float):
    for rnd, err in zip(curve_rounds, errors):
        if err <= target:
            return rnd
    return None


def mnist(device, seed: int = 0) -> dict:
    quiet_flower()
    data = load_dataset("mnist")
    network = {"arch": "lenet-300-100"}
    set_seed(seed)
    central_curve = []
    central = bnnzoo.create("em-tdamp", data.task, data.input_shape, data.output_dim, dataset=data.name,
                            network=network, device=device, seed=seed, keep=KEEP, epochs=MNIST_ROUNDS)

    def track(epoch, loss):
        central_curve.append(1.0 - central.evaluate(data.x_test, data.y_test, num_samples=10)["accuracy"])

    central.fit(data.x_train, data.y_train, progress=False, callback=track)
    central_error = 1.0 - central.evaluate(data.x_test, data.y_test, num_samples=100)["accuracy"]
    target = central_error + 0.01
    out = {"central_error": central_error, "central_curve": central_curve, "target_error": target}
    print(f"  centralised EM-TDAMP: test error {100 * central_error:.2f}%", flush=True)
    parts = []
    for scheme in ("iid", "label-skew"):
        fed = run_federated(data, num_clients=MNIST_CLIENTS, rounds=MNIST_ROUNDS, partition=scheme, alpha=ALPHA,
                            seed=seed, device=device, network=network, keep=KEEP, local_epochs=MNIST_LOCAL_EPOCHS)
        fed_error = 1.0 - fed.model.evaluate(data.x_test, data.y_test, num_samples=100)["accuracy"]
        res = {"federated_error": fed_error, "federated_curve": fed.history["error"],
               "federated_rounds_to_target": _rounds_to(fed.history["eval_round"], fed.history["error"], target),
               "federated_seconds": fed.seconds, "federated_seconds_per_round": fed.history["wall_seconds"][-1] / MNIST_ROUNDS,
               "partition_sizes": fed.partition_sizes, "architecture": fed.model.sparsity()["architecture"]}
        baselines = []
        for epochs, key in ((MNIST_LOCAL_EPOCHS, "fedavg"), (1, "fedavg_1_epoch")):
            avg = run_federated(data, method="fedavg", num_clients=MNIST_CLIENTS, rounds=MNIST_FEDAVG_ROUNDS,
                                partition=scheme, alpha=ALPHA, seed=seed, device=device, network=network,
                                batch_size=central.config["train"]["batch_size"], local_epochs=epochs)
            res.update({f"{key}_error_at_30": avg.history["error"][MNIST_ROUNDS - 1],
                        f"{key}_best_error": min(avg.history["error"]), f"{key}_curve": avg.history["error"],
                        f"{key}_rounds_to_target": _rounds_to(avg.history["eval_round"], avg.history["error"], target),
                        f"{key}_seconds": avg.seconds})
            baselines.append(f"FedAvg with {epochs} local epoch{'s' if epochs > 1 else ''} "
                             f"{100 * res[f'{key}_error_at_30']:.2f}% at round {MNIST_ROUNDS}, best "
                             f"{100 * res[f'{key}_best_error']:.2f}% in {MNIST_FEDAVG_ROUNDS}, reaches the target at "
                             f"round {res[f'{key}_rounds_to_target']}")
        out[scheme] = res
        parts.append(f"{scheme}: federated EM-TDAMP {100 * fed_error:.2f}% after {MNIST_ROUNDS} rounds "
                     f"({100 * (fed_error - central_error):+.2f} points, target within 1: "
                     f"{'met' if fed_error - central_error <= 0.01 else 'not met'}; reaches centralised + 1 point at "
                     f"round {res['federated_rounds_to_target']}); " + "; ".join(baselines))
        print("  " + parts[-1], flush=True)
    headline = (f"MNIST train5k -> t10k, lenet-300-100, {MNIST_CLIENTS} clients, {MNIST_LOCAL_EPOCHS} local passes per "
                f"round, {100 * KEEP:.0f}% of hidden neurons kept; centralised EM-TDAMP ({MNIST_ROUNDS} passes) {100 * central_error:.2f}%; " + "; ".join(parts))
    return {"federated-em-tdamp-mnist": {"model": "federated em-tdamp vs fedavg", "dataset": "mnist-train5k-t10k",
                                         "headline": headline, "clients": MNIST_CLIENTS, "rounds": MNIST_ROUNDS,
                                         "local_epochs": MNIST_LOCAL_EPOCHS,
                                         "fedavg_rounds": MNIST_FEDAVG_ROUNDS, "alpha": ALPHA, "keep": KEEP, **out}}


MNIST100_CLIENTS = 100
MNIST100_PER_ROUND = 10
MNIST100_ROUNDS = int(os.environ.get("BNNZOO_FEDERATED_MNIST100_ROUNDS", "0")) or 50


def mnist100(device, seed: int = 0) -> dict:
    """MNIST with 100 label-skewed clients, 10 sampled per round (module docstring). Centralised
    EM-TDAMP runs ``MNIST100_ROUNDS`` passes; federated EM-TDAMP and FedAvg (Adam clients with the
    same local epochs and the centralised batch size) run as many rounds, evaluated after every
    round with 10 posterior draws (the final EM-TDAMP error with 100)."""
    quiet_flower()
    data = load_dataset("mnist")
    network = {"arch": "lenet-300-100"}
    rounds = MNIST100_ROUNDS
    set_seed(seed)
    start = time.perf_counter()
    central = bnnzoo.create("em-tdamp", data.task, data.input_shape, data.output_dim, dataset=data.name,
                            network=network, device=device, seed=seed, keep=KEEP, epochs=rounds)
    central.fit(data.x_train, data.y_train, progress=False)
    central_seconds = time.perf_counter() - start
    central_error = 1.0 - central.evaluate(data.x_test, data.y_test, num_samples=100)["accuracy"]
    target = central_error + 0.01
    print(f"  centralised EM-TDAMP ({rounds} passes): test error {100 * central_error:.2f}% "
          f"({central_seconds:.0f} s)", flush=True)
    # as much data as the federated run: its rounds' clients hold rounds x per_round / clients passes'
    # worth of examples (50 rounds of 10 of 100 clients: 5 passes)
    equal_passes = max(1, round(rounds * MNIST100_PER_ROUND / MNIST100_CLIENTS))
    set_seed(seed)
    equal = bnnzoo.create("em-tdamp", data.task, data.input_shape, data.output_dim, dataset=data.name,
                          network=network, device=device, seed=seed, keep=KEEP, epochs=equal_passes)
    equal.fit(data.x_train, data.y_train, progress=False)
    equal_error = 1.0 - equal.evaluate(data.x_test, data.y_test, num_samples=100)["accuracy"]
    print(f"  centralised EM-TDAMP ({equal_passes} passes, the federated run's data): test error "
          f"{100 * equal_error:.2f}%", flush=True)
    common = dict(num_clients=MNIST100_CLIENTS, clients_per_round=MNIST100_PER_ROUND, rounds=rounds,
                  partition="label-skew", alpha=ALPHA, seed=seed, device=device, network=network,
                  local_epochs=MNIST_LOCAL_EPOCHS, eval_every=1)
    fed = run_federated(data, keep=KEEP, **common)
    fed_error = 1.0 - fed.model.evaluate(data.x_test, data.y_test, num_samples=100)["accuracy"]
    print(f"  federated EM-TDAMP: {100 * fed_error:.2f}% after {rounds} rounds ({fed.seconds:.0f} s)", flush=True)
    avg = run_federated(data, method="fedavg", batch_size=central.config["train"]["batch_size"], **common)
    print(f"  FedAvg: {100 * avg.history['error'][-1]:.2f}% after {rounds} rounds ({avg.seconds:.0f} s)", flush=True)
    fed_to = _rounds_to(fed.history["eval_round"], fed.history["error"], target)
    avg_to = _rounds_to(avg.history["eval_round"], avg.history["error"], target)
    gap = fed_error - central_error
    headline = (f"MNIST train5k -> t10k, lenet-300-100, {MNIST100_CLIENTS} simulated clients label-skewed by "
                f"Dirichlet({ALPHA}), {MNIST100_PER_ROUND} sampled per round, {MNIST_LOCAL_EPOCHS} local passes, "
                f"{rounds} rounds, {100 * KEEP:.0f}% of hidden neurons kept: federated EM-TDAMP {100 * fed_error:.2f}% "
                f"vs centralised EM-TDAMP ({rounds} passes) {100 * central_error:.2f}% ({100 * gap:+.2f} points, "
                f"target within 1: {'met' if gap <= 0.01 else 'not met'}; reaches centralised + 1 point at round "
                f"{fed_to}; centralised EM-TDAMP on as much data, {equal_passes} passes: {100 * equal_error:.2f}%); "
                f"FedAvg of Adam clients {100 * avg.history['error'][-1]:.2f}% at round {rounds} (best "
                f"{100 * min(avg.history['error']):.2f}%, reaches the target at round {avg_to}); wall time of the "
                f"simulations {fed.seconds:.0f} s (EM-TDAMP) and {avg.seconds:.0f} s (FedAvg) on the shared CPUs")
    return {"federated-mnist-100": {
        "model": "federated em-tdamp vs fedavg", "dataset": "mnist-train5k-t10k", "headline": headline,
        "clients": MNIST100_CLIENTS, "clients_per_round": MNIST100_PER_ROUND, "rounds": rounds,
        "reduced": rounds != 50, "local_epochs": MNIST_LOCAL_EPOCHS, "alpha": ALPHA, "keep": KEEP,
        "central_error": central_error, "central_seconds": central_seconds, "target_error": target,
        "equal_data_passes": equal_passes, "equal_data_central_error": equal_error,
        "federated_error": fed_error, "federated_curve": fed.history["error"], "federated_rounds_to_target": fed_to,
        "federated_seconds": fed.seconds, "federated_failed_clients": fed.failed_clients,
        "fedavg_error": avg.history["error"][-1], "fedavg_best_error": min(avg.history["error"]),
        "fedavg_curve": avg.history["error"], "fedavg_rounds_to_target": avg_to, "fedavg_seconds": avg.seconds,
        "partition_sizes": fed.partition_sizes, "architecture": fed.model.sparsity()["architecture"]}}


SUITES = {"federated-boston": boston, "federated-mnist": mnist, "federated-mnist-100": mnist100}
