"""The ``peers`` suites: one MNIST classification task through plain PyTorch Adam, bnnzoo and the
peer libraries (bayesian-torch, TyXe, laplace-torch), side by side in one process.

Task: MNIST train5k -> t10k (:func:`bnnzoo.data.load_dataset`), LeNet-300-100, batch 128, learning
rate 1e-3, 20 epochs, seed 0 (``peers-mnist``); ``peers-quick`` is the plumbing check: 1 epoch,
1,000 training images drawn at random and the first 1,000 test images. ``peers-lenet5`` and
``peers-lenet5-quick`` are the same with bnnzoo's ``lenet5`` convolutional network. Run on one CPU
thread::

    python -m benchmarks.run peers-quick --threads 1

(The Boston regression task is :mod:`benchmarks.bench_peers_boston`.)

Every method is scored by the same code, :func:`score` (:func:`bnnzoo.metrics.classification_metrics`:
accuracy, NLL, ECE over 15 equal-width confidence bins, Brier), on the same standardised inputs (the
training images' mean and standard deviation, as bnnzoo standardises). Each trained method's epochs
are interleaved with the epochs of a plain Adam run of the same network (:class:`PairedPlain`, the
harness's :class:`~benchmarks.harness.PlainTorch` fed the same index batches as the method), and its
epoch time is reported as the ratio of median epoch times (:func:`~benchmarks.harness.epoch_ratio`,
first epoch skipped; a bnnzoo row also records the ratio of mean epoch times, ``epoch_time_ratio_mean``,
:func:`~benchmarks.harness.mean_epoch_ratio`, which counts every phase of a fit whose epochs differ in cost). bnnzoo entries run through :func:`benchmarks.harness.fit_with_baseline` with
their catalog defaults (the task's architecture; ``peers-quick`` also sets ``epochs=1``), which
interleaves the harness's own plain Adam epochs of the same batch size; each bnnzoo fit predicts
with the library's default predictive and, where the posterior supports them, also with the
``moments`` and ``probit`` predictives (rows ``"... (moments)"``, ``"... (probit)"``), and records
its whole fit time (calibration included) in plain-Adam epochs. Laplace is post hoc on the
reference Adam network: it reports its fit time, in seconds and in plain-Adam epochs. Every method
reports the time to predict the test set and the samples its predictive uses (0: closed form).

The peers are optional (``pip install -e ".[bench]"``): a peer whose import fails is recorded under
``left_out`` with the error's text, and the suite goes on. How each peer is configured and why:
``docs/peers.md`` and :mod:`benchmarks.peers_libs`.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from dataclasses import dataclass, field, replace
from importlib import metadata

import torch

from bnnzoo import metrics
from bnnzoo.data import load_dataset
from bnnzoo.guides.training import minibatches, set_seed
from bnnzoo.models.networks import build_network
from bnnzoo.models.standardizer import Standardizer

from . import peers_libs
from .harness import PlainTorch, epoch_ratio, fit_with_baseline, mean_epoch_ratio

ARCH = "lenet-300-100"
#: the convolutional task's architecture (:func:`bnnzoo.models.networks.lenet5`)
CONV_ARCH = "lenet5"
EPOCHS = 20
BATCH_SIZE = 128
LR = 1e-3
SEED = 0
#: examples per forward pass when predicting the test set
PREDICT_CHUNK = 4096

#: the distributions behind each peer, for the versions a result records
PEER_DISTRIBUTIONS = ("bayesian-torch", "laplace-torch", "backpack-for-pytorch", "tyxe", "pyro-ppl", "torch")


def score(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The one metric code of the suite: accuracy, NLL, ECE (15 equal-width bins) and Brier score of
    predictive class probabilities ``probs`` ``(N, C)`` for labels ``y`` ``(N,)``."""
    return metrics.classification_metrics(probs.detach().to(torch.float64), y)


class PairedPlain(PlainTorch):
    """The harness's plain PyTorch Adam run, stepped through a given list of index batches (those the
    paired method has just used) rather than a fresh shuffle: :meth:`epoch_on`."""

    def epoch_on(self, batches: list[torch.Tensor]) -> None:
        """One plain epoch over ``batches`` (index tensors into the training data), timed into
        ``epoch_seconds``."""
        peers_libs.sync(self.x.device)
        start = time.perf_counter()
        for idx in batches:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(self.module(self.x[idx]), self.y[idx]).backward()
            self.optimizer.step()
        peers_libs.sync(self.x.device)
        self.epoch_seconds.append(time.perf_counter() - start)


@dataclass
class PeerTask:
    """One task as every method of the suite sees it: ``dataset`` (raw, what bnnzoo's ``fit`` takes),
    the standardised training inputs and test inputs on ``device``, the training targets (class
    labels, or for regression standardised with the training targets' mean and sd, as bnnzoo does)
    and raw test targets, ``standardizer``, and the training settings (``hidden``: the hidden widths
    of an ``mlp``, else ``None``). :meth:`schedule` gives every method the same index batches."""

    name: str
    dataset: object
    device: torch.device
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    lr: float = LR
    seed: int = SEED
    arch: str = ARCH
    hidden: list[int] | None = None
    bnnzoo_options: dict = field(default_factory=dict)
    standardizer: Standardizer = field(init=False)
    x_train: torch.Tensor = field(init=False)
    y_train: torch.Tensor = field(init=False)
    x_test: torch.Tensor = field(init=False)
    y_test: torch.Tensor = field(init=False)

    def __post_init__(self):
        data = self.dataset
        std = self.standardizer = Standardizer.from_data(data.x_train, data.y_train, data.task).to(self.device)
        self.x_train = std.x(data.x_train.to(self.device))
        self.y_train = std.y(data.y_train.to(self.device))
        self.x_test = std.x(data.x_test.to(self.device))
        self.y_test = data.y_test.to(self.device)

    def network(self):
        """The task's bnnzoo :class:`~bnnzoo.models.networks.Network`."""
        return build_network(self.arch, tuple(self.dataset.x_train.shape[1:]), int(self.dataset.output_dim),
                             self.hidden)

    def torch_network(self) -> torch.nn.Sequential:
        """The same architecture as a fresh plain PyTorch module (PyTorch's default initialisation)."""
        return self.network().to_torch()

    def schedule(self) -> list[list[torch.Tensor]]:
        """The index batches of every epoch, shuffled by a generator seeded with ``seed``: identical for
        every method that asks."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return [list(minibatches(len(self.x_train), self.batch_size, self.device, generator))
                for _ in range(self.epochs)]

    def test_chunks(self, size: int = PREDICT_CHUNK):
        """The standardised test inputs in chunks of ``size`` examples."""
        return (self.x_test[i:i + size] for i in range(0, len(self.x_test), size))

    def plain(self) -> PairedPlain:
        """A fresh plain Adam run (seeded with ``seed``) of the task's network."""
        return PairedPlain(self.network(), self.x_train, self.y_train, self.dataset.task, self.batch_size,
                           self.lr, "adam", self.seed)

    def train_paired(self, epoch_fn) -> tuple[list[float], PairedPlain]:
        """Run ``epoch_fn(batches)`` once per epoch of :meth:`schedule`, each followed by a plain Adam
        epoch on the same batches. Returns the method's epoch seconds and the plain run."""
        plain = self.plain()
        seconds = []
        for batches in self.schedule():
            _, s = peers_libs.timed(functools.partial(epoch_fn, batches), self.device)
            seconds.append(s)
            plain.epoch_on(batches)
        return seconds, plain

    def score(self, predictive) -> dict[str, float]:
        """The metrics of a method's test-set ``predictive``: here class probabilities, by :func:`score`."""
        return score(predictive, self.y_test)

    def row(self, probs, seconds: list[float], plain: PlainTorch, predict_seconds: float, samples: int, *,
            predictive: str, config: dict) -> dict:
        """The result row of a trained method: its :meth:`score`, epoch times against ``plain``'s, and
        prediction cost."""
        return {**self.score(probs), "epochs": len(seconds),
                "seconds_per_epoch": statistics.median(seconds),
                "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds),
                "epoch_time_ratio": epoch_ratio(seconds, plain.epoch_seconds),
                "predict_seconds": predict_seconds, "predict_samples": samples, "predictive": predictive,
                "config": config}

    def posthoc_row(self, probs, fit_seconds: float, predict_seconds: float, samples: int, *, predictive: str,
                    config: dict) -> dict:
        """The result row of a post hoc method (no epochs of its own): its :meth:`score` and its fit and
        prediction cost; :func:`run_suite` adds the fit time in plain-Adam epochs."""
        return {**self.score(probs), "epochs": 0, "post_hoc": True, "fit_seconds": fit_seconds,
                "epoch_time_ratio": None, "predict_seconds": predict_seconds, "predict_samples": samples,
                "predictive": predictive, "config": config}


def mnist_task(device, *, quick: bool = False, arch: str = ARCH) -> PeerTask:
    """MNIST train5k -> t10k with the suite's settings and network ``arch``; ``quick``: 1 epoch, 1,000
    training images drawn at random (seed :data:`SEED`; the bundled set is sorted by class) and the
    first 1,000 test images."""
    data = load_dataset("mnist")
    suffix = "" if arch == ARCH else f" {arch}"
    if quick:  # the bundled training images are sorted by class: draw the 1,000 at random
        keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(SEED))[:1000]
        data = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                       x_test=data.x_test[:1000], y_test=data.y_test[:1000])
        return PeerTask(f"mnist-train1k-t1k{suffix} (quick)", data, torch.device(device), epochs=1, arch=arch,
                        bnnzoo_options={"epochs": 1})
    return PeerTask(f"mnist-train5k-t10k{suffix}", data, torch.device(device), arch=arch)


# ---- the methods ------------------------------------------------------------------------------------
def plain_adam(task: PeerTask) -> tuple[dict, torch.nn.Module]:
    """The reference: plain PyTorch Adam on the task's batches. Returns its row and its trained module
    (the network Laplace is fitted on)."""
    plain = task.plain()
    for batches in task.schedule():
        plain.epoch_on(batches)
    probs, predict_seconds = peers_libs.timed(lambda: torch.cat([plain.probs(x) for x in task.test_chunks()]),
                                              task.device)
    row = {**score(probs, task.y_test), "epochs": len(plain.epoch_seconds),
           "seconds_per_epoch": statistics.median(plain.epoch_seconds),
           "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds), "epoch_time_ratio": 1.0,
           "predict_seconds": predict_seconds, "predict_samples": 1, "predictive": "softmax of one forward pass",
           "config": {"optimizer": "torch.optim.Adam", "lr": task.lr, "batch_size": task.batch_size}}
    return row, plain.module


#: the predictives a bnnzoo row is also scored with, besides the default one the fit chose, where the
#: posterior supports them (``posterior.predict(x, method=...)``; a posterior that does not raises
#: ``TypeError``)
EXTRA_PREDICT_METHODS = ("sample", "moments", "probit")


def _describe_prediction(prediction) -> str:
    """Words for how a bnnzoo :class:`~bnnzoo.posterior.Prediction` was computed."""
    if prediction.method == "sample":
        text = f"mean softmax of {prediction.num_samples} posterior draws"
        return text if prediction.mc_error is None else f"{text} (chosen by the Monte Carlo error rule)"
    if prediction.method == "probit":
        return "moment propagation, probit approximation of the softmax: closed form"
    return "moment propagation, softmax averaged over quasi-random points of the logits' Gaussian"


def bnnzoo_entry(task: PeerTask, name: str) -> dict:
    """Catalog entry ``name`` with its defaults (plus the task's architecture and ``bnnzoo_options``),
    fitted by :func:`benchmarks.harness.fit_with_baseline` with plain Adam epochs interleaved.

    The row predicts with the library's default predictive, ``posterior.predict(x, chunk_size=...)``
    with no ``num_samples`` or ``method``: ``predict_samples`` is the returned ``num_samples`` (0:
    closed form; ``predict_method``: the predictive, which a calibrated fit chooses on its validation
    rows). Under ``extra_rows`` (which :func:`run_suite` turns into rows ``"<name> (sample)"``,
    ``"<name> (moments)"``, ``"<name> (probit)"``) the same fit scored with each other predictive of
    :data:`EXTRA_PREDICT_METHODS` the posterior supports. Every row records ``fit_seconds_total``
    (wall time of the fit call, the plain Adam epochs interleaved with it subtracted; a calibration
    or epoch-selection fit included), ``fit_in_adam_epochs`` (that over the plain run's median epoch), ``calibration``
    (``posterior.fit_state.calibration``) and ``option_selection`` (the training options chosen
    on validation data, ``posterior.fit_state.option_selection``)."""
    start = time.perf_counter()
    posterior, plain = fit_with_baseline(name, task.dataset, device=task.device, seed=task.seed,
                                         network={"arch": task.arch}, **task.bnnzoo_options)
    fit_seconds = time.perf_counter() - start - sum(plain.epoch_seconds)
    seconds = posterior.history.epoch_seconds
    sp = posterior.sparsity()
    train = posterior.config["train"]
    plain_epoch = statistics.median(plain.epoch_seconds)
    calibration = posterior.fit_state.calibration
    common = {"epochs": len(seconds), "seconds_per_epoch": statistics.median(seconds),
              "plain_seconds_per_epoch": plain_epoch, "epoch_time_ratio": epoch_ratio(seconds, plain.epoch_seconds),
              "epoch_time_ratio_mean": mean_epoch_ratio(seconds, plain.epoch_seconds),
              "fit_seconds_total": fit_seconds, "fit_in_adam_epochs": fit_seconds / plain_epoch,
              "calibration": dict(calibration) if calibration is not None else None,
              "option_selection": posterior.fit_state.option_selection,
              "weights_pruned_fraction": sp["weights_pruned_fraction"], "architecture": sp["architecture"],
              "config": {"options": dict(task.bnnzoo_options), "lr": train.get("lr"),
                         "batch_size": train.get("batch_size"), "epochs": train.get("epochs"),
                         "guide": posterior.config.get("guide"), "model": posterior.config.get("model")}}

    def scored(**method) -> dict:
        prediction, predict_seconds = peers_libs.timed(
            lambda: posterior.predict(task.dataset.x_test, chunk_size=PREDICT_CHUNK, **method), task.device)
        return {**score(prediction.probs, task.y_test), **common, "predict_seconds": predict_seconds,
                "predict_samples": int(prediction.num_samples), "predict_method": prediction.method,
                "mc_error": prediction.mc_error, "predictive": _describe_prediction(prediction)}

    row = scored()
    extra = {}
    for method in EXTRA_PREDICT_METHODS:
        if method == row["predict_method"]:
            continue
        try:
            extra[method] = scored(method=method)
        except TypeError as err:  # the posterior does not support this predictive: no row
            row.setdefault("unsupported_predictives", {})[method] = str(err)
    return {**row, "extra_rows": extra}


#: every method of the suite, in table order: name -> (kind, runner); a runner takes the task and the
#: trained plain Adam module
METHODS = {
    "bnnzoo meanfield-vi": ("bnnzoo", lambda task, adam: bnnzoo_entry(task, "meanfield-vi")),
    "bnnzoo horseshoe-svi": ("bnnzoo", lambda task, adam: bnnzoo_entry(task, "horseshoe-svi")),
    "bayesian-torch Reparameterization": ("peer", lambda task, adam: peers_libs.bayesian_torch(task, "Reparameterization")),
    "bayesian-torch Flipout": ("peer", lambda task, adam: peers_libs.bayesian_torch(task, "Flipout")),
    "TyXe mean-field, local reparam.": ("peer", lambda task, adam: peers_libs.tyxe_mean_field(task)),
    "laplace-torch last-layer Kronecker": ("peer", lambda task, adam: peers_libs.laplace(task, adam, "last-layer-kron")),
    "laplace-torch all-weights diagonal (BackPACK)": ("peer", lambda task, adam: peers_libs.laplace(task, adam, "all-diag")),
}


def run_method(runner, *args) -> tuple[dict | None, str | None]:
    """``(runner(*args), None)``, or ``(None, reason)`` when ``runner`` raises :class:`ImportError` (an
    optional peer library missing or not importable): ``reason`` is the error's type and text. Other
    errors propagate."""
    try:
        return runner(*args), None
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"


def peer_versions() -> dict[str, str | None]:
    """Installed version of each distribution of :data:`PEER_DISTRIBUTIONS` (``None``: not installed)."""
    out = {}
    for dist in PEER_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_suite(task: PeerTask, methods: dict = METHODS, progress: bool = True) -> dict:
    """Run plain Adam and then each of ``methods`` on ``task``; the result the harness writes.

    ``methods`` rows are under ``methods`` (plain Adam first, as ``"plain Adam"``); a runner's
    ``extra_rows`` (``{suffix: row}``, the same fit predicted otherwise) follow its row as
    ``"<name> (<suffix>)"``; a method whose library cannot be imported is under ``left_out`` with
    the reason. Post hoc rows get ``fit_in_adam_epochs`` (fit seconds over the reference's median
    epoch)."""
    set_seed(task.seed)
    start = time.perf_counter()
    adam_row, adam_module = plain_adam(task)
    rows, left_out = {"plain Adam": adam_row}, {}
    if progress:
        print(f"   plain Adam: {_summary(adam_row)}", flush=True)
    for name, (_, runner) in methods.items():
        set_seed(task.seed)
        row, reason = run_method(runner, task, copy.deepcopy(adam_module))
        if row is None:
            left_out[name] = reason
            if progress:
                print(f"   {name}: left out ({reason})", flush=True)
            continue
        extra = row.pop("extra_rows", {})
        if row.get("post_hoc"):
            row["fit_in_adam_epochs"] = row["fit_seconds"] / adam_row["seconds_per_epoch"]
        for label, r in ((name, row), *((f"{name} ({suffix})", r) for suffix, r in extra.items())):
            rows[label] = r
            if progress:
                print(f"   {label}: {_summary(r)}", flush=True)
    result = {"model": "peers", "dataset": task.name, "arch": task.arch,
              "task": {"epochs": task.epochs, "batch_size": task.batch_size, "lr": task.lr, "seed": task.seed,
                       "train_size": len(task.x_train), "test_size": len(task.x_test),
                       "bnnzoo_options": dict(task.bnnzoo_options)},
              "metric_code": "bnnzoo.metrics.classification_metrics (ECE: 15 equal-width bins)",
              "threads": torch.get_num_threads(), "peer_versions": peer_versions(),
              "methods": rows, "left_out": left_out, "suite_seconds": time.perf_counter() - start}
    result["headline"] = headline(result)
    return result


# ---- reporting ----------------------------------------------------------------------------------------
def _cost(row: dict) -> str:
    if row.get("post_hoc"):
        return f"post hoc, fit {row['fit_seconds']:.1f} s"
    if "fit_in_adam_epochs" in row:
        return f"{row['epoch_time_ratio']:.2f}x, fit {row['fit_in_adam_epochs']:.0f} Adam epochs"
    return f"{row['epoch_time_ratio']:.2f}x"


def _samples(row: dict) -> str:
    n = row["predict_samples"]
    if n == 0:  # bnnzoo's "moments" averages the softmax over points of the logits' Gaussian: no weight draws
        return "moments, no weight draws" if row.get("predict_method") == "moments" else "probit, closed form"
    return f"{n} sample" if n == 1 else f"{n} samples"


def _summary(row: dict) -> str:
    return (f"acc {100 * row['accuracy']:.2f}%, NLL {row['nll']:.3f}, ECE {row['ece']:.3f}, {_cost(row)}, "
            f"predict {row['predict_seconds']:.1f} s ({_samples(row)})")


def headline(result: dict) -> str:
    """One line: accuracy / NLL / ECE / epoch time against Adam per method, then what was left out."""
    parts = [f"{name}: {100 * r['accuracy']:.2f}% / {r['nll']:.3f} / {r['ece']:.3f} / {_cost(r)}"
             for name, r in result["methods"].items()]
    text = "acc / NLL / ECE / epoch time vs Adam: " + "; ".join(parts)
    if result["left_out"]:
        text += "; left out: " + ", ".join(sorted(result["left_out"]))
    return text


def table(result: dict) -> str:
    """The result as a Markdown table, one row per method, then one line per method left out."""
    lines = ["| method | acc | NLL | ECE | Brier | epoch time / Adam | predict test set |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        cost = (f"post hoc (fit {r['fit_seconds']:.1f} s = {r['fit_in_adam_epochs']:.1f} Adam epochs)"
                if r.get("post_hoc") else _cost(r))
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['nll']:.3f} | {r['ece']:.3f} | {r['brier']:.3f} | "
                     f"{cost} | {r['predict_seconds']:.2f} s ({_samples(r)}) |")
    for name, reason in result["left_out"].items():
        lines.append(f"\n{name}: left out ({reason})")
    return "\n".join(lines)


def _suite(key: str, device, quick: bool, arch: str = ARCH) -> dict:
    result = run_suite(mnist_task(device, quick=quick, arch=arch))
    print(table(result), flush=True)
    return {key: result}


SUITES = {"peers-mnist": lambda device: _suite("peers-mnist", device, quick=False),
          "peers-quick": lambda device: _suite("peers-quick", device, quick=True),
          "peers-lenet5": lambda device: _suite("peers-lenet5", device, quick=False, arch=CONV_ARCH),
          "peers-lenet5-quick": lambda device: _suite("peers-lenet5-quick", device, quick=True, arch=CONV_ARCH)}
