"""Federated EM-TDAMP on Flower (Xu, Liu, Zhang & Lau 2024), on Flower's ServerApp / ClientApp.

- :mod:`.aggregation`: Gaussian product / weighted geometric mean, product of odds (pure torch);
- :mod:`.partition`: IID and label-skewed (Dirichlet) client partitions;
- :mod:`.standardize`: the statistics round (training statistics from the clients' sums);
- :mod:`.client`: a client's local work (TDAMP passes on local data from the global posterior);
- :mod:`.strategy`: the server's aggregation and EM step;
- :mod:`.fedavg`: the FedAvg-of-Adam baseline (Adam clients, Flower's FedAvg strategy with a seeded draw of clients);
- :mod:`.codec`: the TDAMP messages as arrays;
- :mod:`.settings`: a run's settings as Flower's run config, :class:`FederatedError`;
- :mod:`.client_app`, :mod:`.server_app`: Flower's ``ClientApp`` and ``ServerApp`` of a run;
- :mod:`.run`: simulated runs in Flower's Simulation Runtime (Ray).
"""

from .aggregation import gaussian_product, product_of_odds
from .partition import iid, label_skew, partition
from .settings import FederatedError

__all__ = [
    "FederatedError",
    "gaussian_product",
    "iid",
    "label_skew",
    "partition",
    "product_of_odds",
    "run_federated",
]


def run_federated(*args, **kwargs):
    """:func:`bnnzoo.federated.run.run_federated` (Flower is imported on the first call)."""
    from .run import run_federated as run  # lazy: flwr and its Simulation Runtime

    return run(*args, **kwargs)
