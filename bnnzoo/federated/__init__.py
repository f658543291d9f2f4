"""Federated EM-TDAMP on Flower (Xu, Liu, Zhang & Lau 2024).

- :mod:`.aggregation`: Gaussian product / weighted geometric mean, product of odds (pure torch);
- :mod:`.partition`: IID and label-skewed (Dirichlet) client partitions;
- :mod:`.standardize`: the statistics round (training statistics from the clients' sums);
- :mod:`.client`: the Flower client (TDAMP passes on local data from the global posterior);
- :mod:`.strategy`: the Flower strategy (aggregation, EM step, broadcast);
- :mod:`.fedavg`: the FedAvg-of-Adam baseline on Flower's ``FedAvg``;
- :mod:`.handshake`: the run spec server and clients must share, :class:`FederatedError`;
- :mod:`.roster`: who takes part: waiting, the handshake, the minimum of clients per round;
- :mod:`.run`: one-machine runs, server plus client processes on loopback.
"""

from .aggregation import gaussian_product, product_of_odds
from .handshake import FederatedError
from .partition import iid, label_skew, partition

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
    from .run import run_federated as run  # lazy: flwr (Flower's server and client)

    return run(*args, **kwargs)
