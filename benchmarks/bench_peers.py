"""The ``peers`` suites: one MNIST classification task through plain PyTorch Adam, bnnzoo and the
peer libraries (bayesian-torch, TyXe, laplace-torch), side by side in one process.

Task: MNIST train5k -> t10k (:func:`bnnzoo.data.load_dataset`), LeNet-300-100, batch 128, learning
rate 1e-3, 20 epochs, seed 0 (``peers-mnist``); ``peers-quick`` is the plumbing check: 1 epoch,
1,000 training images drawn at random and the first 1,000 test images. Run it on one CPU thread::

    python -m benchmarks.run peers-quick --threads 1

Every method is scored by the same code, :func:`score` (:func:`bnnzoo.metrics.classification_metrics`:
accuracy, NLL, ECE over 15 equal-width confidence bins, Brier), on the same standardised inputs (the
training images' mean and standard deviation, as bnnzoo standardises). Each trained method's epochs
are interleaved with the epochs of a plain Adam run of the same network (:class:`PairedPlain`, the
harness's :class:`~benchmarks.harness.PlainTorch` fed the same index batches as the method), and its
epoch time is reported as the ratio of median epoch times (:func:`~benchmarks.harness.epoch_ratio`,
first epoch skipped). bnnzoo entries run through :func:`benchmarks.harness.fit_with_baseline` with
their catalog defaults (the task's architecture; ``peers-quick`` also sets ``epochs=1``), which
interleaves the harness's own plain Adam epochs of the same batch size. Laplace is post hoc on the
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
from .harness import TEST_DRAWS, PlainTorch, epoch_ratio, fit_with_baseline

ARCH = "lenet-300-100"
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
    """One classification task as every method of the suite sees it: ``dataset`` (raw, what bnnzoo's
    ``fit`` takes), the standardised training and test tensors on ``device``, and the training
    settings. :meth:`schedule` gives every method the same index batches."""

    name: str
    dataset: object
    device: torch.device
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    lr: float = LR
    seed: int = SEED
    arch: str = ARCH
    bnnzoo_options: dict = field(default_factory=dict)
    x_train: torch.Tensor = field(init=False)
    y_train: torch.Tensor = field(init=False)
    x_test: torch.Tensor = field(init=False)
    y_test: torch.Tensor = field(init=False)

    def __post_init__(self):
        data = self.dataset
        std = Standardizer.from_data(data.x_train, data.y_train, data.task).to(self.device)
        self.x_train = std.x(data.x_train.to(self.device))
        self.y_train = data.y_train.to(self.device)
        self.x_test = std.x(data.x_test.to(self.device))
        self.y_test = data.y_test.to(self.device)

    def network(self):
        """The task's bnnzoo :class:`~bnnzoo.models.networks.Network`."""
        return build_network(self.arch, tuple(self.dataset.x_train.shape[1:]), int(self.dataset.num_classes))

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
        return PairedPlain(self.network(), self.x_train, self.y_train, "classification", self.batch_size, self.lr,
                           "adam", self.seed)

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

    def row(self, probs, seconds: list[float], plain: PlainTorch, predict_seconds: float, samples: int, *,
            predictive: str, config: dict) -> dict:
        """The result row of a trained method: its :func:`score`, epoch times against ``plain``'s, and
        prediction cost."""
        return {**score(probs, self.y_test), "epochs": len(seconds),
                "seconds_per_epoch": statistics.median(seconds),
                "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds),
                "epoch_time_ratio": epoch_ratio(seconds, plain.epoch_seconds),
                "predict_seconds": predict_seconds, "predict_samples": samples, "predictive": predictive,
                "config": config}

    def posthoc_row(self, probs, fit_seconds: float, predict_seconds: float, samples: int, *, predictive: str,
                    config: dict) -> dict:
        """The result row of a post hoc method (no epochs of its own): its :func:`score` and its fit and
        prediction cost; :func:`run_suite` adds the fit time in plain-Adam epochs."""
        return {**score(probs, self.y_test), "epochs": 0, "post_hoc": True, "fit_seconds": fit_seconds,
                "epoch_time_ratio": None, "predict_seconds": predict_seconds, "predict_samples": samples,
                "predictive": predictive, "config": config}


def mnist_task(device, *, quick: bool = False) -> PeerTask:
    """MNIST train5k -> t10k with the suite's settings; ``quick``: 1 epoch, 1,000 training images drawn
    at random (seed :data:`SEED`; the bundled set is sorted by class) and the first 1,000 test images."""
    data = load_dataset("mnist")
    if quick:  # the bundled training images are sorted by class: draw the 1,000 at random
        keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(SEED))[:1000]
        data = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                       x_test=data.x_test[:1000], y_test=data.y_test[:1000])
        return PeerTask("mnist-train1k-t1k (quick)", data, torch.device(device), epochs=1,
                        bnnzoo_options={"epochs": 1})
    return PeerTask("mnist-train5k-t10k", data, torch.device(device))


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


def bnnzoo_entry(task: PeerTask, name: str) -> dict:
    """Catalog entry ``name`` with its defaults (plus the task's architecture and ``bnnzoo_options``),
    fitted by :func:`benchmarks.harness.fit_with_baseline` with plain Adam epochs interleaved; its
    predictive uses :data:`~benchmarks.harness.TEST_DRAWS` draws."""
    posterior, plain = fit_with_baseline(name, task.dataset, device=task.device, seed=task.seed,
                                         network={"arch": task.arch}, **task.bnnzoo_options)
    prediction, predict_seconds = peers_libs.timed(
        lambda: posterior.predict(task.dataset.x_test, num_samples=TEST_DRAWS, chunk_size=PREDICT_CHUNK),
        task.device)
    seconds = posterior.history.epoch_seconds
    sp = posterior.sparsity()
    train = posterior.config["train"]
    return {**score(prediction.probs, task.y_test), "epochs": len(seconds),
            "seconds_per_epoch": statistics.median(seconds),
            "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds),
            "epoch_time_ratio": epoch_ratio(seconds, plain.epoch_seconds),
            "predict_seconds": predict_seconds, "predict_samples": TEST_DRAWS,
            "predictive": f"mean softmax of {TEST_DRAWS} posterior draws",
            "weights_pruned_fraction": sp["weights_pruned_fraction"], "architecture": sp["architecture"],
            "config": {"options": dict(task.bnnzoo_options), "lr": train.get("lr"),
                       "batch_size": train.get("batch_size"), "epochs": train.get("epochs"),
                       "guide": posterior.config.get("guide"), "model": posterior.config.get("model")}}


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

    ``methods`` rows are under ``methods`` (plain Adam first, as ``"plain Adam"``); a method whose
    library cannot be imported is under ``left_out`` with the reason. Post hoc rows get
    ``fit_in_adam_epochs`` (fit seconds over the reference's median epoch)."""
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
        if row.get("post_hoc"):
            row["fit_in_adam_epochs"] = row["fit_seconds"] / adam_row["seconds_per_epoch"]
        rows[name] = row
        if progress:
            print(f"   {name}: {_summary(row)}", flush=True)
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
    return f"{row['epoch_time_ratio']:.2f}x"


def _samples(row: dict) -> str:
    n = row["predict_samples"]
    return "closed form" if n == 0 else f"{n} sample" if n == 1 else f"{n} samples"


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
                if r.get("post_hoc") else f"{r['epoch_time_ratio']:.2f}x")
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['nll']:.3f} | {r['ece']:.3f} | {r['brier']:.3f} | "
                     f"{cost} | {r['predict_seconds']:.2f} s ({_samples(r)}) |")
    for name, reason in result["left_out"].items():
        lines.append(f"\n{name}: left out ({reason})")
    return "\n".join(lines)


def _suite(device, quick: bool) -> dict:
    task = mnist_task(device, quick=quick)
    key = "peers-quick" if quick else "peers-mnist"
    result = run_suite(task)
    print(table(result), flush=True)
    return {key: result}


SUITES = {"peers-mnist": lambda device: _suite(device, quick=False),
          "peers-quick": lambda device: _suite(device, quick=True)}
