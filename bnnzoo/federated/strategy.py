"""The server's step of federated EM-TDAMP: aggregate the local posteriors, then the EM step.

Every round the clients run TDAMP passes from the global posterior (:mod:`.client`); the server

1. combines their slab posteriors per weight by the Gaussian product and their inclusion
   probabilities per neuron by the product of odds (:mod:`.aggregation`).

   ``weighting="geometric"`` (the default) is the weighted geometric mean with ``w_k = n_k / n``
   (with sampled clients, ``n`` is the examples of the round's clients, and each client forgets only
   that share of a centralised pass: :func:`.client.local_passes`).
   Client ``k`` holds ``n_k`` of the ``n`` training examples; it runs its passes with the
   forgetting rate of its own ``n_k`` examples and its messages scaled by ``n / n_k``
   (``likelihood_scale`` of :meth:`~bnnzoo.guides.TDAMPGuide.update`, see
   :func:`.client.local_passes`), so its local posterior is the global one times its likelihood
   ``L_k`` raised to ``n / n_k``: each client stands for the whole training set. The weighted
   geometric mean then holds ``prod_k (L_k^{n / n_k})^{n_k / n} = prod_k L_k``, the whole data's
   likelihood (exactly so for Gaussian messages), and a round forgets and absorbs as much as one
   centralised pass. (Without the scale each local
   posterior holds only ``n_k`` examples' worth of data and the geometric mean is about as wide
   as one client's posterior: the global posterior tempered by ~``K``. Passing ``num_data = n``
   instead would keep the steady state right but forget, and so move, ``K`` times slower per round.)
   The clients' steps are averaged, so the rounds are as stable as the centralised passes.

   ``weighting="product"`` takes every client with weight 1 and the broadcast global posterior
   with weight ``1 - K``: the global posterior times every client's new likelihood, the clients
   running with ``num_data = n`` and unscaled messages. A round again matches one centralised
   pass, but the clients' parallel steps add up instead of being averaged, so it needs a smaller
   ``damping`` than the geometric mean;
2. sets the global posterior to the result (:meth:`~bnnzoo.guides.TDAMPGuide.set_posterior`,
   whose per-neuron ``rho`` reproduces the combined inclusion probabilities);
3. runs the EM M-step (:func:`~bnnzoo.guides.tdamp_em.m_step`: sparsity rates, optionally the slab
   variances, and the noise variance from the clients' summed statistics) on those inclusion
   probabilities; the prior that is broadcast is the previous one moved by the M-step (the
   per-neuron adjustment of step 2 serves this round only, see :meth:`FederatedTDAMP.aggregate`;
   with a ``keep`` target the combined inclusion probabilities hold exactly its fraction of
   neurons above 1/2, the broadcast posterior about that fraction: the gap between the product of
   odds and the evidence of the combined messages can move a neuron near 1/2 across it. The
   broadcast prior is not shifted once more to make that count exact: that would feed the
   messages' unbounded log-odds back into the prior, which is unstable);
4. broadcasts the new global posterior.

The rounds themselves (sampling the clients, sending the global posterior, collecting the
replies, failures) are the ServerApp's (:mod:`.server_app`); this module is the server's maths on
the replies, free of Flower.
"""

from __future__ import annotations

import time

import torch

from bnnzoo.errors import ConfigError
from bnnzoo.guides.tdamp_em import m_step

from . import codec
from .aggregation import gaussian_product, product_of_odds

WEIGHTINGS = ("product", "geometric")
INCLUSION_EPS = 1e-6  # combined inclusion probabilities are kept in [eps, 1 - eps]


class FederatedTDAMP:
    """Server side of federated EM-TDAMP (module docstring).

    ``posterior``: the server's :class:`~bnnzoo.methods.tdamp.TDAMPPosterior` (its guide holds the
    global posterior; its ``keep`` and its config's ``train`` section give the M-step options);
    ``num_data``: the total number of training examples over all clients. :attr:`history` records
    every round: the clients that answered and failed, their mean negative log evidence, the kept
    fraction, the noise variance and the seconds of the aggregation.
    """

    def __init__(self, posterior, num_data: int, *, local_epochs: int = 1, weighting: str = "geometric"):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
        for name, value in (("num_data", num_data), ("local_epochs", local_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.posterior, self.guide = posterior, posterior.guide
        self.num_data, self.local_epochs, self.weighting = num_data, local_epochs, weighting
        self.global_layout = codec.global_layout(posterior.net)
        self.reply_layout = codec.reply_layout(posterior.net)
        self.history: dict[str, list] = {k: [] for k in ("round", "clients", "failures", "loss", "kept_fraction",
                                                           "noise_var", "aggregate_seconds")}

    def __repr__(self) -> str:
        return f"FederatedTDAMP(weighting={self.weighting!r}, local_epochs={self.local_epochs})"

    def global_arrays(self) -> list:
        """The global posterior as the arrays every client of a round receives (:mod:`.codec`)."""
        return codec.to_ndarrays(self.guide.state(), self.global_layout)

    def round_config(self, server_round: int, round_data: int = 0) -> dict:
        """The configuration of round ``server_round`` for the clients (:func:`.client.local_passes`);
        ``round_data``: the examples held by the round's clients (0: every client takes part)."""
        return {"stage": "tdamp", "epochs": self.local_epochs, "round": server_round, "num_data": self.num_data,
                "round_data": int(round_data), "weighting": self.weighting}

    def end_round(self, server_round: int, results: list[tuple[list, int]], failures: int) -> float | None:
        """Aggregate round ``server_round``'s ``results`` (each client's reply arrays and number of
        examples; ``failures`` clients did not answer) and run the EM step; returns the clients'
        mean negative log evidence per example (``None`` without answers: the global posterior is
        left unchanged)."""
        if not results:
            self._record(server_round, 0, failures, None)
            return None
        start = time.perf_counter()
        device = self.posterior.device
        replies = [codec.from_ndarrays(arrays, self.reply_layout, device) for arrays, _ in results]
        self.aggregate(replies, [n for _, n in results])
        loss = -sum(float(r["log_evidence_sum"]) for r in replies) / max(sum(float(r["num_seen"]) for r in replies), 1.0)
        self._record(server_round, len(results), failures, loss)
        self.history["aggregate_seconds"].append(time.perf_counter() - start)
        return loss

    # ---- the server's E-step aggregation and M-step ------------------------------------------------
    @torch.no_grad()
    def aggregate(self, replies: list[dict], sizes: list[int]) -> None:
        """Combine the clients' local posteriors into the global one and run the EM step (module
        docstring); ``replies`` are decoded client replies, ``sizes`` their numbers of examples."""
        guide, net = self.guide, self.posterior.net
        current = guide.state()
        k = len(replies)
        if self.weighting == "product":
            weights = torch.ones(k)
            prior = current
        else:
            weights = torch.tensor(sizes, dtype=torch.float64)
            weights = (weights / weights.sum()).float()
            prior = None
        slab_mean, slab_var = {}, {}
        for site in net.sites():
            layer = site.rpartition(".")[0]
            means = torch.stack([r["slab_mean"][site] for r in replies])
            variances = torch.stack([r["slab_var"][site] for r in replies])
            s2 = current["prior_var"][layer].reshape((-1,) + (1,) * (means.dim() - 2))
            slab_mean[site], slab_var[site] = gaussian_product(
                means, variances, weights,
                None if prior is None else prior["slab_mean"][site], None if prior is None else prior["slab_var"][site],
                min_precision=1.0 / s2)
        inclusion = {}
        for layer in net.hidden_layers():
            probs = torch.stack([r["inclusion"][layer.name] for r in replies])
            p = product_of_odds(probs, weights, None if prior is None else prior["inclusion"][layer.name])
            inclusion[layer.name] = p.clamp(INCLUSION_EPS, 1.0 - INCLUSION_EPS)
        hidden = [layer.name for layer in net.hidden_layers()]
        broadcast = {name: guide.prior.logit_rho(name).clone() for name in hidden}
        guide.set_posterior(slab_mean, slab_var, inclusion)
        combined = {name: guide.prior.logit_rho(name).clone() for name in hidden}
        guide.set_state({key: sum(r[key] for r in replies) for key in ("noise_sum", "num_seen", "log_evidence_sum")})
        train = self.posterior.config["train"]
        keep = self.posterior.keep
        m_step(guide, keep=keep, learn_rho=train["learn_rho"], learn_slab_var=train["learn_slab_var"],
               learn_noise=train["learn_noise"])
        if keep is not None or not train["learn_rho"]:
            # The per-neuron prior log-odds that made Module B reproduce the combined inclusion
            # probabilities are a device of this round only (the gap between the product of odds and
            # the evidence of the combined messages); left in the prior they would pile up round after
            # round. The prior keeps its broadcast value moved by the M-step's change alone.
            for name in hidden:
                moved = broadcast[name] + (guide.prior.logit_rho(name) - combined[name])
                guide.prior.set_group_parameters(name, logit_rho=moved)
        guide.check_finite()

    def _record(self, server_round, clients, failures, loss) -> None:
        h = self.history
        h["round"].append(server_round)
        h["clients"].append(clients)
        h["failures"].append(failures)
        h["loss"].append(loss)
        inclusion = self.guide.inclusion()
        total = sum(p.numel() for p in inclusion.values())
        h["kept_fraction"].append(float(sum((p > 0.5).sum() for p in inclusion.values())) / total if total else 1.0)
        h["noise_var"].append(float(self.guide.noise_var()))
