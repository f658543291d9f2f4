"""Client partitions of a training set: IID, and label-skewed (non-IID) by a Dirichlet draw.

``label-skew`` (Hsu, Qi & Brown 2019): for every class, the shares of its examples that go to the
``K`` clients are drawn from ``Dirichlet(alpha 1_K)``; a small ``alpha`` gives each client a few
classes. Regression targets are first cut into ``num_bins`` quantile bins, which play the classes.
"""

from __future__ import annotations

import torch

from bnnzoo.errors import ConfigError

SCHEMES = ("iid", "label-skew")


def iid(num_examples: int, num_clients: int, seed: int = 0) -> list[torch.Tensor]:
    """A random split into ``num_clients`` parts of (nearly) equal size."""
    _check(num_examples, num_clients)
    gen = torch.Generator().manual_seed(seed)
    return [part.sort().values for part in torch.randperm(num_examples, generator=gen).tensor_split(num_clients)]


def label_skew(labels: torch.Tensor, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 2,
               num_bins: int = 10, max_tries: int = 100) -> list[torch.Tensor]:
    """A Dirichlet(``alpha``) label-skewed split (module docstring); float ``labels`` (regression)
    are binned by quantiles. Draws are repeated until every client has ``min_size`` examples."""
    labels = torch.as_tensor(labels).cpu()
    _check(len(labels), num_clients, min_size)
    if not alpha > 0:
        raise ConfigError(f"alpha must be positive, got {alpha!r}")
    if labels.is_floating_point():
        edges = torch.quantile(labels.double(), torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1])
        labels = torch.bucketize(labels.double(), edges)
    gen = torch.Generator().manual_seed(seed)
    concentration = torch.full((num_clients,), float(alpha), dtype=torch.float64)
    for _ in range(max_tries):
        parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=gen)]
            shares = _dirichlet(concentration, gen)
            cuts = (shares.cumsum(0) * len(idx)).round().long()[:-1].tolist()
            for k, chunk in enumerate(torch.tensor_split(idx, cuts)):
                parts[k].append(chunk)
        out = [torch.cat(p).sort().values for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split of {len(labels)} examples over {num_clients} clients gave every "
                     f"client {min_size} examples in {max_tries} draws; raise alpha or lower the number of clients")


def _dirichlet(concentration: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A ``Dirichlet(concentration)`` draw driven by ``gen`` (torch's sampler takes no generator, so
    it runs under a forked global generator seeded from ``gen``; the caller's RNG state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        return torch.distributions.Dirichlet(concentration).sample()


def partition(targets: torch.Tensor, num_clients: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
              **options) -> list[torch.Tensor]:
    """Index tensors of each client's examples under ``scheme`` (``"iid"`` or ``"label-skew"``)."""
    if scheme == "iid":
        return iid(len(targets), num_clients, seed)
    if scheme == "label-skew":
        return label_skew(targets, num_clients, alpha=alpha, seed=seed, **options)
    raise ConfigError(f"unknown partition {scheme!r}; choose from {SCHEMES}")


def _check(num_examples: int, num_clients: int, min_size: int = 1) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_examples < num_clients * min_size:
        raise ValueError(f"{num_examples} examples cannot give {num_clients} clients {min_size} examples each")
