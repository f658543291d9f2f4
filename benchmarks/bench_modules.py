"""The ``module-nets`` suites: the catalog's methods on module architectures (ResNet-20, vit-tiny,
mixer-small), epoch time against plain PyTorch training of the same module on the same batches.

Timing task: synthetic CIFAR-sized data (3x32x32 images in [0, 1], 10 classes, labels from a fixed
random linear read-out of the images, so the task is learnable), ``N`` training images, batch 128.
For every architecture:

* meanfield-vi and horseshoe-svi (catalog defaults, no validation part, no calibration: the fit
  itself is timed) against plain ``torch.optim.Adam`` at lr 1e-3, their epochs interleaved with the
  plain epochs (:func:`benchmarks.harness.fit_with_baseline`); ratio of median epoch times, first
  epoch skipped (targets: at most 2.5x);
* spike-slab-sghmc (two cycles, at least 4 epochs) against plain SGD with momentum 0.9 at lr 1e-2
  (target: at most 1.3x);
* one post-hoc BMR reduction (``Posterior.reduce(rule="ss")`` of the mean-field fit, deep copy
  included) against that fit's median epoch (target: at most 5%);
* peak memory of training: on CUDA ``torch.cuda.max_memory_allocated`` over the interleaved fit; on
  the CPU (Linux), the peak resident memory of the method's epochs and of its plain baseline's,
  each measured in a fresh process on 256 images (:mod:`benchmarks.peak_memory`), and the ratio of
  what their epochs allocate above the resting process.

``module-nets`` runs N = 1,024 images for 4 epochs; ``module-nets-quick`` N = 256 for 2 epochs (the
plumbing check). Run on one CPU thread, or on a GPU::

    python -m benchmarks.run module-nets --threads 1

``module-mnist-mixer`` and ``module-mnist-vit``: BMR's architectures on MNIST train5k -> t10k,
bmr-iterative at its catalog classification defaults (epochs, learning rate and reduction rule read
from the catalog) with plain Adam interleaved, against
the flat mean-field posterior of the same settings (the comparison of :mod:`benchmarks.bench_bmr`);
both without the validation part (no calibration: the comparison is of the fits), 32 test draws.
"""

from __future__ import annotations

import statistics
import time

import torch

from bnnzoo.catalog import get_entry
from bnnzoo.data import Dataset

from .bench_bmr import _mnist as mnist_comparison
from .harness import epoch_ratio, fit_with_baseline
from .peak_memory import cpu_epoch_peak

ARCHS = ("resnet-20", "vit-tiny", "mixer-small")
BATCH_SIZE = 128
#: the catalog's validation-based choices are off: the fit itself is what is timed
UNTIMED_CHOICES = {"validation_fraction": None}
TARGETS = {"meanfield-vi": 2.5, "horseshoe-svi": 2.5, "spike-slab-sghmc": 1.3}
#: images of the peak-memory runs on the CPU (two minibatches of BATCH_SIZE: the peak is a step's)
PEAK_IMAGES = 2 * BATCH_SIZE


def synthetic_images(n: int, seed: int = 0, shape=(3, 32, 32), classes: int = 10) -> Dataset:
    """``n`` training and ``n // 4`` test images, labels the argmax of a fixed random linear read-out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + n // 4, *shape, generator=g)
    readout = torch.randn(int(torch.tensor(shape).prod()), classes, generator=g)
    y = ((x.flatten(1) - 0.5) @ readout).argmax(1)
    return Dataset("synthetic-cifar", "classification", x[:n], y[:n], x[n:], y[n:], num_classes=classes)


def _peak(device, fn) -> tuple[float | None, object]:
    if device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, out


def _cpu_peaks(arch: str, name: str, baseline: str, lr: float, epochs: int) -> dict:
    """Peak resident memory of ``name``'s training epochs and of its plain baseline's, each in a
    fresh process on :data:`PEAK_IMAGES` images (:mod:`benchmarks.peak_memory`)."""
    job = {"network": {"arch": arch}, "n": PEAK_IMAGES, "batch_size": BATCH_SIZE}
    method = cpu_epoch_peak({**job, "entry": name, "options": _options(name, epochs)})
    plain = cpu_epoch_peak({**job, "plain": baseline, "lr": lr})
    if method is None or plain is None:
        return {}
    return {"cpu_peak_rss_mib": method["peak_rss_mib"], "plain_cpu_peak_rss_mib": plain["peak_rss_mib"],
            "cpu_epoch_rise_mib": method["epoch_rise_mib"], "plain_cpu_epoch_rise_mib": plain["epoch_rise_mib"],
            "cpu_epoch_rise_ratio": method["epoch_rise_mib"] / plain["epoch_rise_mib"]}


def _options(name: str, epochs: int) -> dict:
    if name == "spike-slab-sghmc":  # two cycles (one of warm-up), each at least two epochs long
        return {"epochs": max(epochs, 4), "batch_size": BATCH_SIZE, "cycles": 2}
    return {"epochs": epochs, "batch_size": BATCH_SIZE, **UNTIMED_CHOICES}


def architecture_rows(arch: str, data: Dataset, device, epochs: int) -> dict:
    """Every method on ``arch``: epoch-time ratio against its plain baseline, and one reduction."""
    rows = {}
    fitted = {}
    for name, baseline in (("meanfield-vi", "adam"), ("horseshoe-svi", "adam"), ("spike-slab-sghmc", "sgd")):
        lr = 1e-3 if baseline == "adam" else 1e-2
        peak, (posterior, plain) = _peak(device, lambda: fit_with_baseline(
            name, data, device=device, seed=0, baseline=baseline, baseline_lr=lr, network={"arch": arch},
            **_options(name, epochs)))
        ratio = epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds)
        rows[name] = {"baseline": f"plain {baseline} (lr {lr:g})", "epoch_time_ratio": ratio,
                      "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
                      "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds[1:]),
                      "peak_memory_mib": peak, "weights": posterior.net.num_weights(),
                      "target": TARGETS[name], "meets_target": ratio <= TARGETS[name]}
        fitted[name] = posterior
        if device.type == "cpu":
            rows[name].update(_cpu_peaks(arch, name, baseline, lr, epochs))
    flat = fitted["meanfield-vi"]
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        flat.reduce(rule="ss")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    epoch = statistics.median(flat.history.epoch_seconds[1:])
    rows["bmr (one reduction)"] = {"reduce_seconds": statistics.median(seconds), "epoch_seconds": epoch,
                                   "fraction_of_an_epoch": statistics.median(seconds) / epoch, "target": 0.05,
                                   "meets_target": statistics.median(seconds) / epoch <= 0.05}
    return rows


def run(device, n: int, epochs: int, archs=ARCHS) -> dict:
    data = synthetic_images(n)
    result = {"model": "module architectures", "dataset": f"synthetic 3x32x32, {n} images, batch {BATCH_SIZE}",
              "epochs": epochs, "rows": {}}
    for arch in archs:
        result["rows"][arch] = architecture_rows(arch, data, device, epochs)
    parts = []
    for arch, rows in result["rows"].items():
        ratios = ", ".join(f"{k} {v['epoch_time_ratio']:.2f}x" for k, v in rows.items() if "epoch_time_ratio" in v)
        parts.append(f"{arch}: {ratios}, one BMR reduction {100 * rows['bmr (one reduction)']['fraction_of_an_epoch']:.1f}% "
                     f"of an epoch")
    result["headline"] = "; ".join(parts)
    return result


def mnist_bmr(device, arch: str) -> dict:
    train = get_entry("bmr-iterative").defaults["classification"]["train"]
    out, flat, _ = mnist_comparison({"arch": arch}, arch, device=device, epochs=train["epochs"], num_samples=32,
                                    variants={f"bmr-iterative-mnist-{arch}": {"rule": train["rule"]}},
                                    options={"validation_fraction": None, "lr": train["lr"]})
    return {**out, f"meanfield-vi-mnist-{arch}": flat}


def mnist_resnet_spike_slab(device, arch: str = "resnet-8") -> dict:
    """spike-slab-sghmc at its catalog classification defaults on MNIST train5k -> t10k with a
    catalog ResNet, plain SGD with momentum (lr 1e-2) interleaved on the same batches; the fraction
    of the residual blocks' inner channels (``blocks.*.conv1``) pruned, and the exported module
    (posterior-mean weights, pruned inner channels removed where exact) scored on the same images."""
    from bnnzoo import metrics  # lazy: only this suite scores the exported module
    from bnnzoo.data import load_dataset  # lazy: only this suite reads MNIST

    data = load_dataset("mnist")
    posterior, plain = fit_with_baseline("spike-slab-sghmc", data, device=device, seed=0, baseline="sgd",
                                         baseline_lr=1e-2, network={"arch": arch})
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=posterior.num_draws)
    x_test = posterior.standardizer.x(data.x_test.to(posterior.device))
    y_test = data.y_test.to(posterior.device)
    sgd = metrics.classification_metrics(plain.probs(x_test), y_test)
    keep = posterior.sparsity()["keep"]
    inner = {name: k for name, k in keep.items() if name.startswith("blocks.") and name.endswith(".conv1")}
    inner_total = sum(int(k.numel()) for k in inner.values())
    inner_pruned = sum(int((~k).sum()) for k in inner.values())
    exported = posterior.to_torch().eval().to(posterior.device)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(exported(x_test[i:i + 1024]), -1) for i in range(0, len(x_test), 1024)])
    exported_metrics = metrics.classification_metrics(probs, y_test)
    channels_after = {name: exported.get_submodule(name).out_channels for name in inner}
    removed = sum(int(k.numel()) - channels_after[name] for name, k in inner.items())
    result = {
        "model": "spike-slab-sghmc", "dataset": "mnist train5k -> t10k", "arch": arch,
        "config": posterior.config, "metrics": m, "plain_sgd": sgd,
        "accuracy_gap_points": 100 * (sgd["accuracy"] - m["accuracy"]),
        "inner_channels": inner_total, "inner_channels_pruned": inner_pruned,
        "inner_channels_pruned_fraction": inner_pruned / inner_total,
        "inner_channels_removed_in_export": removed, "exported_metrics": exported_metrics,
        "weights_pruned_fraction": posterior.sparsity()["weights_pruned_fraction"],
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
        "targets": {"within_1_point_of_sgd": 100 * (sgd["accuracy"] - m["accuracy"]) <= 1.0,
                    "at_least_half_inner_channels_pruned": inner_pruned >= 0.5 * inner_total},
    }
    result["headline"] = (f"spike-slab-sghmc {arch}: accuracy {100 * m['accuracy']:.2f}% (SGD+momentum "
                          f"{100 * sgd['accuracy']:.2f}%), {100 * result['inner_channels_pruned_fraction']:.0f}% of "
                          f"the blocks' inner channels pruned ({inner_pruned} of {inner_total}; {removed} removed "
                          f"in the export, the rest masked), exported module (posterior mean) accuracy "
                          f"{100 * exported_metrics['accuracy']:.2f}%, epoch time {result['epoch_time_ratio']:.2f}x SGD's")
    return {f"spike-slab-mnist-{arch}": result}


SUITES = {
    "module-mnist-resnet": mnist_resnet_spike_slab,
    "module-mnist-mixer": lambda device: mnist_bmr(device, "mixer-small"),
    "module-mnist-vit": lambda device: mnist_bmr(device, "vit-tiny"),
    "module-nets": lambda device: {"module-nets": run(device, 1024, 4)},
    "module-nets-quick": lambda device: {"module-nets-quick": run(device, 256, 2)},
}
