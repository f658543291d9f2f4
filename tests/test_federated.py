"""Federated EM-TDAMP on Flower: the aggregation formulas against closed forms, the partitions and
the statistics round, the clients' local epochs, the ServerApp's rounds on an in-process grid,
simulated runs in Flower's Simulation Runtime (Ray), and a SuperLink with two SuperNodes over TLS
with node authentication (``flwr run``)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from bnnzoo.catalog import get_entry
from bnnzoo.cli import main
from bnnzoo.data import load_dataset
from bnnzoo.errors import ConfigError
from bnnzoo.federated import (
    codec,
    gaussian_product,
    iid,
    label_skew,
    partition,
    product_of_odds,
)
from bnnzoo.federated.client import StandardizedClient, TDAMPClient, local_passes
from bnnzoo.federated.client_app import client_app
from bnnzoo.federated.fedavg import AdamClient, SeededFedAvg, state_of
from bnnzoo.federated.run import FederatedServer, build_posterior, run_federated
from bnnzoo.federated.settings import (
    RUN_CONFIG,
    FederatedError,
    from_run_config,
    resolve_clients_per_round,
    resolve_min_clients,
    write_app,
)
from bnnzoo.federated.standardize import (
    decode,
    encode,
    moments,
    standardizer_from_moments,
)
from bnnzoo.federated.strategy import FederatedTDAMP
from bnnzoo.guides.training import DivergenceError, minibatches
from bnnzoo.methods.tdamp import TDAMPPosterior
from bnnzoo.models.standardizer import Standardizer


def _grid_moments(log_density: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of a density known up to a constant on a uniform grid (quadrature)."""
    w = torch.softmax(log_density, 0)
    mean = (w * grid).sum()
    return float(mean), float((w * (grid - mean) ** 2).sum())


def _log_normal(x, m, v):
    return -0.5 * (x - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [2.0, 0.25, 0.7]])
def test_gaussian_product_matches_the_normalised_product_by_quadrature(weights):
    means = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    variances = torch.tensor([[0.5], [2.0], [0.8]], dtype=torch.float64)
    mean, var = gaussian_product(means, variances, weights)
    grid = torch.linspace(-15, 15, 300001, dtype=torch.float64)
    logp = sum(w * _log_normal(grid, float(m), float(v)) for w, m, v in zip(weights, means, variances))
    m_q, v_q = _grid_moments(logp, grid)
    assert float(mean) == pytest.approx(m_q, abs=1e-6)
    assert float(var) == pytest.approx(v_q, rel=1e-5)
    # the closed form of the plain product of two Gaussians
    m2, v2 = gaussian_product(means[:2], variances[:2], [1.0, 1.0])
    v_exact = 1 / (1 / 0.5 + 1 / 2.0)
    assert float(v2) == pytest.approx(v_exact)
    assert float(m2) == pytest.approx(v_exact * (0.3 / 0.5 - 1.2 / 2.0))


def test_gaussian_product_with_a_shared_prior_is_prior_times_every_likelihood():
    """Clients that each multiplied the shared prior by their own Gaussian likelihood: the product
    with weights 1 and the prior at weight 1 - K is the prior times all the likelihoods."""
    gen = torch.Generator().manual_seed(0)
    m0, v0 = torch.randn(5, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    lik_m = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    lik_v = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.2
    post_v = 1 / (1 / v0 + 1 / lik_v)
    post_m = post_v * (m0 / v0 + lik_m / lik_v)
    mean, var = gaussian_product(post_m, post_v, [1.0, 1.0, 1.0], m0, v0)
    exact_v = 1 / (1 / v0 + (1 / lik_v).sum(0))
    exact_m = exact_v * (m0 / v0 + (lik_m / lik_v).sum(0))
    torch.testing.assert_close(var, exact_v)
    torch.testing.assert_close(mean, exact_m)
    # a product whose precision would not be positive stays proper at the floor
    _, floored = gaussian_product(post_m, post_v, [0.0, 0.0, 0.0], m0, -v0, min_precision=0.25)
    assert bool((floored == 4.0).all())


def test_gaussian_product_rejects_bad_input():
    with pytest.raises(ValueError, match="one weight per client"):
        gaussian_product(torch.zeros(2, 3), torch.ones(2, 3), [1.0])
    with pytest.raises(ValueError, match="variances must be positive"):
        gaussian_product(torch.zeros(2, 3), torch.zeros(2, 3), [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_product(torch.zeros(2, 3), torch.ones(2, 3), [1.0, -1.0])


def test_product_of_odds_is_bayes_rule_with_independent_evidence():
    """Binary s with prior p0 and evidence e_k independent given s: each client's posterior uses its
    own evidence; their product of odds over the prior is the exact joint posterior."""
    p0 = 0.3
    lik = [(0.9, 0.2), (0.4, 0.7), (0.6, 0.5)]  # (P(e_k | s=1), P(e_k | s=0))
    client = torch.tensor([p0 * a / (p0 * a + (1 - p0) * b) for a, b in lik], dtype=torch.float64)
    joint1 = p0 * math.prod(a for a, _ in lik)
    joint0 = (1 - p0) * math.prod(b for _, b in lik)
    combined = product_of_odds(client, [1.0, 1.0, 1.0], torch.tensor(p0, dtype=torch.float64))
    assert float(combined) == pytest.approx(joint1 / (joint1 + joint0), rel=1e-9)
    # weights that sum to one: the weighted geometric mean of the odds
    geo = product_of_odds(client, [0.5, 0.25, 0.25])
    odds = client / (1 - client)
    expected = odds[0] ** 0.5 * odds[1] ** 0.25 * odds[2] ** 0.25
    assert float(geo) == pytest.approx(float(expected / (1 + expected)), rel=1e-9)


def test_partitions_cover_the_data_once():
    labels = torch.arange(1000) % 10
    for parts in (iid(1000, 7, seed=1), label_skew(labels, 7, alpha=0.3, seed=1)):
        joined = torch.cat(parts)
        assert len(joined) == 1000 and len(joined.unique()) == 1000
    sizes = [len(p) for p in iid(1000, 7)]
    assert max(sizes) - min(sizes) <= 1
    # label skew: a client holds far fewer classes' worth of its data than under IID
    skew = label_skew(labels, 10, alpha=0.1, seed=0)
    top_share = [float(torch.bincount(labels[p], minlength=10).max()) / len(p) for p in skew]
    even = [float(torch.bincount(labels[p], minlength=10).max()) / len(p) for p in iid(1000, 10)]
    assert sum(top_share) / 10 > 0.5 > sum(even) / 10
    # regression targets are binned
    assert len(torch.cat(label_skew(torch.randn(300), 4, seed=0)).unique()) == 300
    with pytest.raises(ValueError, match="unknown partition"):
        partition(labels, 3, "by-hash")
    with pytest.raises(ValueError, match="cannot give"):
        iid(3, 5)


@pytest.mark.parametrize("shape, task", [((13,), "regression"), ((1, 4, 4), "classification")])
def test_standardizer_from_client_sums_equals_the_pooled_one(shape, task):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, *shape, generator=gen) * 3 + 1
    x[:, 0] = 2.0 if len(shape) == 1 else x[:, 0]  # a constant feature is only centred
    y = torch.randn(60, generator=gen) * 5 + 2 if task == "regression" else torch.randint(0, 3, (60,))
    parts = [moments(x[i], y[i], task) for i in (slice(0, 10), slice(10, 35), slice(35, 60))]
    std = decode(encode(standardizer_from_moments(parts, task, image=len(shape) > 1)))
    pooled = Standardizer.from_data(x, y, task)
    torch.testing.assert_close(std.x(x), pooled.x(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.y(y.float()), pooled.y(y.float()), atol=1e-5, rtol=1e-5)


# ---- the likelihood scale of the clients' passes -------------------------------------------------
def _tdamp_guide(data, seed=0, **guide_options):
    return build_posterior(data, seed=seed, network={"arch": "mlp", "hidden": [8]}, **guide_options).guide


def _standardised(data):
    std = Standardizer.from_data(data.x_train, data.y_train, data.task)
    return std.x(data.x_train), std.y(data.y_train)


def _messages(guide):
    return {site: tuple(t.clone() for t in guide.message(site)) for site in guide.net.sites()}


def test_likelihood_scale_multiplies_the_whole_batch_message():
    """A batch's message scaled by 2 is that batch seen twice (the same forgetting rate: twice the
    examples of twice the data set), step control included; scale 1 is the plain update, bitwise."""
    data = load_dataset("boston", split=0).subset(64, 10, seed=0)
    x, y = _standardised(data)
    guides = [_tdamp_guide(data) for _ in range(4)]
    for g in guides[1:]:
        g.load_state_dict(guides[0].state_dict())
    scaled, doubled, plain, unit = guides
    for idx in (torch.arange(0, 8), torch.arange(8, 16), torch.arange(16, 24)):
        scaled.update(x[idx], y[idx], 64, likelihood_scale=2.0)
        doubled.update(torch.cat([x[idx], x[idx]]), torch.cat([y[idx], y[idx]]), 128)
        plain.update(x[idx], y[idx], 64)
        unit.update(x[idx], y[idx], 64, likelihood_scale=1.0)
    a, b, p, u = (_messages(g) for g in guides)
    moved = False
    for site in a:
        for i in range(2):
            torch.testing.assert_close(a[site][i], b[site][i], rtol=1e-4, atol=1e-5)
            assert torch.equal(p[site][i], u[site][i])
            moved = moved or not torch.allclose(a[site][i], p[site][i], rtol=1e-3, atol=1e-4)
    assert moved  # the scale changes the state
    with pytest.raises(ValueError, match="likelihood_scale"):
        plain.update(x[:8], y[:8], 64, likelihood_scale=0.0)


def test_a_client_with_half_the_data_and_scale_two_stands_for_the_whole_set():
    """TDAMP passes over a random half of the data with the half's forgetting rate and the message
    scaled by 2 give about the posterior precision of passes over all of it; unscaled, about half."""
    data = load_dataset("boston", split=0).subset(256, 10, seed=0)
    x, y = _standardised(data)
    half = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:128]
    runs = {}
    for name, (xs, ys, scale) in {"full": (x, y, 1.0), "scaled": (x[half], y[half], 2.0),
                                  "unscaled": (x[half], y[half], 1.0)}.items():
        guide = _tdamp_guide(data, memory=1.0)
        torch.manual_seed(0)
        for _ in range(8):
            for idx in minibatches(len(xs), 32, "cpu"):
                guide.update(xs[idx], ys[idx], len(xs), likelihood_scale=scale)
        # the data's total precision on each site
        runs[name] = {site: float(guide.message(site)[1].sum()) for site in guide.net.sites()}
    for site, full in runs["full"].items():
        gap_scaled = abs(math.log(runs["scaled"][site] / full))
        gap_unscaled = abs(math.log(runs["unscaled"][site] / full))
        assert gap_scaled < 0.25 < math.log(1.5) < gap_unscaled, site
        assert runs["unscaled"][site] < full


def test_clients_scale_to_the_whole_set_under_the_geometric_weighting():
    assert local_passes(100, {"num_data": 400, "weighting": "geometric"}) == (100, 4.0)
    assert local_passes(100, {"num_data": 400}) == (100, 4.0)
    assert local_passes(100, {"num_data": 400, "weighting": "product"}) == (400, 1.0)
    assert local_passes(100, {"num_data": 0}) == (100, 1.0)  # the whole set's size unknown: the client's own
    with pytest.raises(ValueError, match="cannot hold"):
        local_passes(100, {"num_data": 50})
    # a round of sampled clients holding N_r of the N examples: the scaled likelihood still stands for
    # the whole set (scale * num_data = N), and an epoch over the client's n examples forgets the
    # share n / num_data = N_r / N of the state that a centralised pass over the round's data would
    for n, share, total in ((50, 500, 5000), (7, 480, 5000), (100, 400, 400), (30, 90, 120)):
        num_data, scale = local_passes(n, {"num_data": total, "round_data": share})
        assert scale * num_data == pytest.approx(total, rel=1e-12)
        assert n / num_data == pytest.approx(share / total, rel=0.02)
    assert local_passes(50, {"num_data": 5000, "round_data": 5000}) == local_passes(50, {"num_data": 5000})
    assert local_passes(50, {"num_data": 5000, "round_data": 500, "weighting": "product"}) == (5000, 1.0)
    with pytest.raises(ValueError, match="the round's clients hold 40 examples"):
        local_passes(50, {"num_data": 5000, "round_data": 40})


def _tdamp_client(server, x, y, seed):
    """A client holding ``x, y`` that builds the server's posterior from its configuration, as the
    ClientApp does."""
    return TDAMPClient(get_entry("em-tdamp").create(copy.deepcopy(server.config), device="cpu"), x, y, seed=seed)


def _in_process_round(strategy, clients, blob, rnd):
    """One round without Flower: every client's fit on the global arrays, then the aggregation."""
    arrays = strategy.global_arrays()
    config = {**strategy.round_config(rnd), "standardizer": blob}
    results = [c.fit(arrays, config) for c in clients]
    replies = [codec.from_ndarrays(a, strategy.reply_layout, "cpu") for a, _, _ in results]
    strategy.aggregate(replies, [n for _, n, _ in results])
    return replies


def test_server_aggregation_of_one_client_is_that_client_and_the_prior_stays_per_layer():
    """In process (no Flower): with one client the geometric mean is the client's own posterior;
    with several, the broadcast prior log-odds stay one value per layer (the per-neuron adjustment
    that reproduces the product of odds is not carried over), and the constrained M-step keeps its
    fraction of neurons (exactly in the combined inclusion probabilities it runs on; in the broadcast
    posterior up to the neurons near 1/2 that the gap between the product of odds and the combined
    messages' evidence moves across it)."""
    data = load_dataset("boston", split=0).subset(200, 50, seed=0)
    server = build_posterior(data, seed=0, keep=0.4)
    parts = iid(200, 3, seed=0)
    clients = [_tdamp_client(server, data.x_train[p], data.y_train[p], k) for k, p in enumerate(parts)]
    std = standardizer_from_moments([c.statistics() for c in clients], "regression", False)
    blob = encode(std)
    strategy = FederatedTDAMP(server, 200)
    reply = _in_process_round(strategy, clients[:1], blob, 1)[0]
    state = strategy.guide.state()
    for site in server.net.sites():
        torch.testing.assert_close(state["slab_mean"][site], reply["slab_mean"][site], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state["slab_var"][site], reply["slab_var"][site], rtol=1e-4, atol=1e-7)
    for rnd in range(2, 5):
        _in_process_round(strategy, clients, blob, rnd)
        logit = strategy.guide.prior.logit_rho("fc1")
        assert float(logit.max() - logit.min()) < 1e-4
    assert abs(int((strategy.guide.inclusion()["fc1"] > 0.5).sum()) - 20) <= 2
    assert strategy.guide.noise_var() > 0


def test_a_clients_local_epochs_run_in_the_epoch_loop():
    """Both kinds of client time and record every local epoch in their history, and a diverging
    client stops with DivergenceError (the ClientApp reports it to the server as the round's failure)."""
    data = load_dataset("boston", split=0).subset(120, 30, seed=0)
    server = build_posterior(data, seed=0, network={"arch": "mlp", "hidden": [8]})
    tdamp = _tdamp_client(server, data.x_train, data.y_train, 0)
    fedavg = AdamClient(server.net.to_torch(), data.x_train, data.y_train, "regression", 32, seed=0)
    blob = encode(standardizer_from_moments([moments(data.x_train, data.y_train, "regression")], "regression", False))
    config = {"stage": "tdamp", "epochs": 3, "round": 1, "num_data": 120, "weighting": "geometric",
              "standardizer": blob}
    _, n, metrics = tdamp.fit(codec.to_ndarrays(server.guide.state(), codec.global_layout(server.net)), config)
    assert n == 120 and len(tdamp.history.loss) == 3 and len(tdamp.history.epoch_seconds) == 3
    # the reply's statistics add up over the round's epochs; each epoch's loss is its own part of them
    assert metrics["log_evidence"] == pytest.approx(-sum(tdamp.history.loss) / 3, rel=1e-5)

    weights = state_of(fedavg.module)
    config = {"stage": "fedavg", "epochs": 2, "round": 1, "standardizer": blob}
    _, _, first = fedavg.fit(weights, config)
    _, _, second = fedavg.fit(weights, {**config, "round": 2})
    assert len(fedavg.history.loss) == 4 and all(t > 0 for t in fedavg.history.epoch_seconds)
    assert (first["train_loss"], second["train_loss"]) == (fedavg.history.loss[1], fedavg.history.loss[3])
    with pytest.raises(DivergenceError, match="FedAvg client"):
        fedavg.fit({name: w * np.nan for name, w in weights.items()}, {**config, "round": 3})


def test_the_fedavg_aggregate_is_flowers_example_weighted_mean(task_identity, monkeypatch):
    """The baseline's strategy is Flower's FedAvg: its train messages carry the global arrays and
    Flower's ``server-round``, and a round of three clients' replies (arriving in any order) goes
    through ``FedAvg.aggregate_train`` (in the run's order of clients) to the mean of their weights
    weighted by their ``num-examples``, and their train losses alike."""
    seen = []
    flower_aggregate = FedAvg.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.append([reply.metadata.src_node_id for reply in replies])
        return flower_aggregate(self, server_round, replies)

    monkeypatch.setattr(FedAvg, "aggregate_train", spy)
    sizes = {101: 10, 102: 30, 103: 60}
    strategy = SeededFedAvg([101, 102, 103], 3, seed=0)
    assert isinstance(strategy, FedAvg)
    initial = ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(4)})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({"lr": 0.1}), grid=None))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102, 103]
    assert all(m.metadata.message_type == "train" and m.content["config"]["server-round"] == 1 for m in messages)
    gen = torch.Generator().manual_seed(0)
    states, replies = {}, []
    for message in sorted(messages, key=lambda m: -m.metadata.dst_node_id):  # the replies arrive in reverse
        node = message.metadata.dst_node_id
        states[node] = {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
        metrics = MetricRecord({"num-examples": sizes[node], "train_loss": float(node)})
        replies.append(Message(RecordDict({"arrays": ArrayRecord(states[node]), "metrics": metrics}),
                               reply_to=message))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert seen == [[101, 102, 103]]
    out = arrays.to_torch_state_dict()
    for key in ("w", "b"):
        exact = sum(states[n][key].double() * k for n, k in sizes.items()) / 100
        torch.testing.assert_close(out[key].double(), exact, rtol=1e-6, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx((101 * 10 + 102 * 30 + 103 * 60) / 100)


def test_the_fedavg_draw_is_seeded_with_flowers_count():
    """Each round asks Flower's count of clients (``fraction_train`` of them, at least
    ``min_train_nodes``): ``clients_per_round`` drawn by ``random.Random(seed)`` from the given
    order; the same seed gives the same rounds, another seed others; bad counts are named."""
    clients = list(range(1000, 1100))
    first, again = SeededFedAvg(clients, 10, seed=3), SeededFedAvg(clients, 10, seed=3)
    assert (first.fraction_train, first.min_train_nodes, first.fraction_evaluate) == (0.1, 10, 0.0)
    rounds = [first.sample(r) for r in range(1, 6)]
    rng = random.Random(3)
    assert rounds == [sorted(rng.sample(clients, 10)) for _ in range(5)]
    assert rounds == [again.sample(r) for r in range(1, 6)] and first.asked[5] == rounds[4]
    assert rounds != [SeededFedAvg(clients, 10, seed=4).sample(r) for r in range(1, 6)]
    assert SeededFedAvg(clients[:3], 3).sample(1) == clients[:3]
    with pytest.raises(ConfigError, match="clients_per_round must be a count from 1 to 3"):
        SeededFedAvg(clients[:3], 4)
    with pytest.raises(ConfigError, match="distinct node ids"):
        SeededFedAvg([1, 1, 2], 1)


def test_adams_state_kept_by_the_node_continues_the_same_optimisation():
    """A FedAvg client rebuilt for its next round from the Adam state its node kept (as the
    ClientApp does through Flower's Context) continues exactly as the same client would have;
    without the state it does not."""
    data = load_dataset("boston", split=0).subset(64, 10, seed=0)
    server = build_posterior(data, seed=0, network={"arch": "mlp", "hidden": [4]})
    blob = encode(standardizer_from_moments([moments(data.x_train, data.y_train, "regression")], "regression", False))
    config = {"stage": "fedavg", "epochs": 1, "round": 1, "standardizer": blob}

    def client():
        torch.manual_seed(0)
        return AdamClient(server.net.to_torch(), data.x_train, data.y_train, "regression", 16, seed=0)

    same = client()
    start = state_of(same.module)
    after_one, _, _ = same.fit(start, config)
    kept = ArrayRecord(same.optimizer_state())
    continued, _, _ = same.fit(after_one, {**config, "round": 2})
    rebuilt = client()
    rebuilt.load_optimizer_state(kept.to_torch_state_dict())
    resumed, _, _ = rebuilt.fit(after_one, {**config, "round": 2})
    fresh, _, _ = client().fit(after_one, {**config, "round": 2})
    for name in continued:
        assert torch.equal(continued[name], resumed[name])
    assert any(not torch.allclose(continued[name], fresh[name]) for name in continued)


# ---- the ServerApp's rounds on an in-process grid -----------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    """The identity Flower's runtime gives the process of a ServerApp (its messages carry it)."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LoopbackGrid:
    """Flower's ``Grid`` in this process: each message goes straight to the ClientApp of its node
    (a real :func:`client_app`, each node with its own Flower ``Context``); node ``ids[k]`` (default
    ``100 + k``) holds partition ``k``; nodes listed in ``silent`` answer the statistics round but no
    training round (their replies are dropped, as after a connection lost mid-run)."""

    def __init__(self, app, num_nodes: int, silent=(), ids=None):
        self.app, self.silent = app, set(silent)
        ids = [100 + k for k in range(num_nodes)] if ids is None else list(ids)
        self.contexts = {ids[k]: Context(run_id=1, node_id=ids[k], node_config={"partition-id": k,
                                         "num-partitions": num_nodes}, state=RecordDict(), run_config={})
                         for k in range(num_nodes)}
        self.sent: list[tuple[str, int]] = []
        self.round_data: dict[int, set] = {}  # round -> the round_data its train messages carried

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append((message.metadata.message_type, node))
            if message.metadata.message_type == "train" and "round_data" in message.content["config"]:
                self.round_data.setdefault(int(message.content["config"]["round"]), set()).add(
                    int(message.content["config"]["round_data"]))
            reply = self.app(message, self.contexts[node])
            if node not in self.silent or message.metadata.message_type != "train":
                replies.append(reply)
        return replies


def test_the_server_app_samples_clients_names_the_failed_and_stops_short_of_the_minimum(boston, task_identity):
    """Four clients, two sampled per round. Client 1 fails in round 2 (its ClientApp answers with an
    error) and node 103 (client 3) never answers: with a minimum of one the run goes on and names
    both with the round and the reason; with a minimum of two the first round that falls short
    stops the run, naming the round and the failed clients. The statistics round asks every node
    and its standardiser is the pooled one."""
    network = {"arch": "mlp", "hidden": [6]}
    parts = iid(len(boston.y_train), 4, seed=0)
    app = client_app(boston, parts, crash=(1, 2))
    server = FederatedServer(boston, num_clients=4, clients_per_round=2, rounds=4, network=network, min_clients=1,
                             keep=0.5, round_timeout=5.0)
    grid = LoopbackGrid(app, 4, silent={103})
    server.main(grid)
    statistics = [node for kind, node in grid.sent if kind == "query.statistics"]
    train = [node for kind, node in grid.sent if kind == "train"]
    assert sorted(statistics) == [100, 101, 102, 103] and len(train) == 8
    asked = [r["asked"] for r in server.rounds_log]
    assert all(len(a) == 2 for a in asked) and len({tuple(a) for a in asked}) > 1  # a new draw each round
    pooled = Standardizer.from_data(boston.x_train, boston.y_train, "regression")
    torch.testing.assert_close(server.standardizer.x(boston.x_train), pooled.x(boston.x_train), atol=1e-5, rtol=1e-5)
    expected = {}
    for r in server.rounds_log:
        if "client 1" in r["asked"] and r["round"] == 2:
            expected["client 1"] = "round 2: RuntimeError: lost in round 2 (fault injection)"
        if "client 3" in r["asked"]:
            expected["client 3"] = f"round {r['round']}: no answer in 5 s"
    assert expected and server.failed == expected
    # each round tells its clients how many examples the round's clients hold (their forgetting rate)
    sizes = {f"client {k}": len(p) for k, p in enumerate(parts)}
    assert grid.round_data == {r["round"]: {sum(sizes[c] for c in r["asked"])} for r in server.rounds_log}
    assert server.history["clients"] == [len(r["answered"]) for r in server.rounds_log]
    assert server.history["eval_round"] == [1, 2, 3, 4] and all(math.isfinite(v) for v in server.history["nmse"])
    assert isinstance(server.model, TDAMPPosterior)

    short = FederatedServer(boston, num_clients=4, clients_per_round=2, rounds=4, network=network, keep=0.5,
                            round_timeout=5.0)
    with pytest.raises(FederatedError) as info:
        short.main(LoopbackGrid(client_app(boston, parts), 4, silent={103}))
    failing = next(r for r in short.rounds_log if "client 3" in r["asked"])
    assert str(info.value) == (f"round {failing['round']}: 1 of the 2 clients asked answered, fewer than the minimum "
                               f"2; failed clients: client 3: round {failing['round']}: no answer in 5 s")
    assert short.history["eval_round"] == list(range(1, failing["round"]))  # nothing evaluated after the short round


def test_the_fedavg_baseline_runs_on_flowers_fedavg_and_asks_the_same_clients_for_a_seed(boston, task_identity,
                                                                                           monkeypatch):
    """The FedAvg server's rounds are Flower's: ``FedAvg.start`` runs them, every round's global
    weights are ``FedAvg.aggregate_train``'s example-weighted mean of the replies, the server's
    evaluation is the strategy's ``evaluate_fn`` (the same history keys, Flower's ``Result`` holds
    the same figures) and the final network is the last aggregate. Run again on SuperNodes with
    other node ids (Flower's are random), the same seed asks the same clients, by name, and gives
    the same weights bit for bit; ordering the clients by node id instead would not."""
    calls = {"start": 0, "aggregate": []}
    flower_start, flower_aggregate = FedAvg.start, FedAvg.aggregate_train

    def start(self, *args, **kwargs):
        calls["start"] += 1
        return flower_start(self, *args, **kwargs)

    def aggregate(self, server_round, replies):
        replies = list(replies)
        out = flower_aggregate(self, server_round, replies)
        calls["aggregate"].append((replies, out[0]))
        return out

    monkeypatch.setattr(FedAvg, "start", start)
    monkeypatch.setattr(FedAvg, "aggregate_train", aggregate)
    parts = iid(len(boston.y_train), 5, seed=0)

    def run(ids):
        server = FederatedServer(boston, method="fedavg", num_clients=5, clients_per_round=2, rounds=3, seed=1,
                                 eval_every=2, network={"arch": "mlp", "hidden": [4]})
        server.main(LoopbackGrid(client_app(boston, parts), 5, ids=ids))
        return server

    ids = [900 - 7 * k for k in range(5)]  # partition 0 on the largest node id
    a, b = run(None), run(ids)
    assert isinstance(a.strategy, FedAvg) and calls["start"] == 2 and len(calls["aggregate"]) == 6
    for replies, arrays in calls["aggregate"]:
        n = [int(r.content["metrics"]["num-examples"]) for r in replies]
        states = [r.content["arrays"].to_torch_state_dict() for r in replies]
        assert len(replies) == 2 and sum(n) < len(boston.y_train)
        for key, value in arrays.to_torch_state_dict().items():
            exact = sum(s[key].double() * k for s, k in zip(states, n)) / sum(n)
            torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=1e-6)
    final = calls["aggregate"][2][1].to_torch_state_dict()
    assert all(torch.equal(value, final[key]) for key, value in a.model.state_dict().items())
    assert a.history["eval_round"] == [2, 3] and a.history["clients"] == [2, 2, 2] and a.failed == {}
    assert {"nmse", "rmse", "wall_seconds", "eval_seconds"} <= set(a.history)
    assert sorted(a.result.evaluate_metrics_serverapp) == [2, 3]
    assert a.result.evaluate_metrics_serverapp[3]["nmse"] == a.history["nmse"][-1]
    assert set(a.result.train_metrics_clientapp) == {1, 2, 3}
    asked = [r["asked"] for r in a.rounds_log]
    names = [f"client {k}" for k in range(5)]
    rng = random.Random(1)
    assert asked == [sorted(rng.sample(names, 2)) for _ in range(3)]
    assert [r["asked"] for r in b.rounds_log] == asked and a.history["nmse"] == b.history["nmse"]
    assert all(torch.equal(v, w) for v, w in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    by_node_id = [names[ids.index(node)] for node in sorted(ids)]  # the names in the order of b's node ids
    rng = random.Random(1)
    assert asked != [sorted(rng.sample(by_node_id, 2)) for _ in range(3)]


def test_a_server_whose_clients_never_come_fails_naming_the_count(boston, task_identity):
    reports = []
    server = FederatedServer(boston, num_clients=3, rounds=1, network={"arch": "mlp", "hidden": [4]},
                             min_clients=0.5, wait_timeout=0.5, report_every=0.2, report=reports.append)
    grid = LoopbackGrid(client_app(boston, iid(len(boston.y_train), 3)), 3)
    grid.contexts = dict(list(grid.contexts.items())[:1])  # one of the three SuperNodes connected
    with pytest.raises(FederatedError, match=r"^only 1 of 3 clients connected in 0 s; the run needs at least 3 \("):
        server.main(grid)
    assert any(r.startswith("waiting for clients: 1 of 3 connected") for r in reports)


# ---- simulated runs (Flower's Simulation Runtime, Ray) --------------------------------------------
@pytest.fixture(scope="module")
def boston():
    return load_dataset("boston", split=0)


def test_two_client_simulation_completes_and_improves(boston):
    run = run_federated(boston, num_clients=2, rounds=4, seed=0, keep=0.4)
    h = run.history
    assert h["eval_round"] == [1, 2, 3, 4] and h["clients"] == [2, 2, 2, 2]
    assert h["nmse"][-1] < h["nmse"][0]
    assert h["loss"][-1] < h["loss"][0]  # the clients' log evidence of their passes improves too
    assert isinstance(run.model, TDAMPPosterior) and run.model.sparsity()["architecture"] == "13-20-1"
    m = run.model.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert m["rmse"] ** 2 / float(boston.y_test.var()) < 0.5
    assert sum(run.partition_sizes) == len(boston.y_train) and run.failed_clients == {}


def test_a_simulation_that_falls_short_raises_naming_the_round_and_the_client(boston):
    """The ServerApp's error leaves the Simulation Runtime as the caller's FederatedError."""
    with pytest.raises(FederatedError) as info:
        run_federated(boston, method="fedavg", num_clients=2, rounds=3, crash=(0, 2),
                      network={"arch": "mlp", "hidden": [4]})
    assert str(info.value) == ("round 2: 1 of the 2 clients asked answered, fewer than the minimum 2; failed clients: "
                               "client 0: round 2: RuntimeError: lost in round 2 (fault injection)")


def test_cli_simulates_the_fedavg_baseline_on_sampled_clients():
    result = CliRunner().invoke(main, ["federated", "--method", "fedavg", "--clients", "3", "--clients-per-round",
                                       "2", "--rounds", "3", "--eval-every", "1", "--local-epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "fedavg: 3 clients (iid), 2 per round, 3 rounds in" in result.output
    curve = json.loads(result.output.strip().splitlines()[-1])
    assert curve["eval_round"] == [1, 2, 3] and curve["nmse"][-1] < curve["nmse"][0]
    bad = CliRunner().invoke(main, ["federated", "--hidden", "fifty"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output


def test_bad_federated_options_are_named(boston):
    with pytest.raises(ValueError, match="unknown federated method"):
        run_federated(boston, method="fedprox", rounds=1)
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        run_federated(boston, rounds=0)
    with pytest.raises(ValueError, match="unknown partition"):
        run_federated(boston, partition="by-zip", rounds=1)
    with pytest.raises(ValueError, match="clients_per_round must be a count from 1 to 4"):
        run_federated(boston, clients_per_round=5, rounds=1)


@pytest.mark.cuda
def test_federated_run_on_cuda(boston):
    mean, var = gaussian_product(torch.zeros(2, 3, device="cuda"), torch.ones(2, 3, device="cuda"), [0.5, 0.5])
    assert mean.device.type == "cuda" and var.device.type == "cuda"
    run = run_federated(boston, num_clients=2, rounds=2, device="cuda", keep=0.5)
    assert run.model.guide.message("fc1.weight")[0].device.type == "cuda"
    assert run.history["nmse"][-1] < 1.0


def test_a_client_without_local_fit_cannot_be_made():
    class Incomplete(StandardizedClient):
        pass

    with pytest.raises(TypeError, match="local_fit"):
        Incomplete(torch.zeros(3, 2), torch.zeros(3), "regression", "cpu")


def test_min_clients_and_clients_per_round_counts_and_fractions():
    assert resolve_min_clients(None, 4) == 4 and resolve_min_clients(3, 4) == 3
    assert resolve_min_clients(0.5, 4) == 2 and resolve_min_clients(0.6, 4) == 3 and resolve_min_clients(1.0, 4) == 4
    for bad in (0, 5, 0.0, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="min_clients"):
            resolve_min_clients(bad, 4)
    assert resolve_clients_per_round(None, 100) == 100 and resolve_clients_per_round(0, 100) == 100
    assert resolve_clients_per_round(10, 100) == 10
    for bad in (101, -1, True, 2.5):
        with pytest.raises(ConfigError, match="clients_per_round"):
            resolve_clients_per_round(bad, 100)


def test_the_run_config_of_a_deployed_run_round_trips_through_the_app(tmp_path):
    """``write_app`` writes a Flower App whose run config gives back the settings; unknown keys and
    values of the wrong type are named."""
    path = write_app(tmp_path / "app", num_clients=2, rounds=3, hidden="8", options={"keep": 0.5}, min_clients="1",
                     clients_per_round=None)
    doc = tomllib.loads(path.read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": "bnnzoo.federated.server_app:app",
                                                        "clientapp": "bnnzoo.federated.client_app:app"}
    settings = from_run_config(doc["tool"]["flwr"]["app"]["config"])
    assert settings["options"] == {"keep": 0.5} and settings["min_clients"] == 1 and settings["rounds"] == 3
    assert settings["clients_per_round"] == 0 and set(doc["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG)
    with pytest.raises(ConfigError, match=r"unknown run config keys \['round'\]"):
        from_run_config({"round": 3})
    with pytest.raises(ConfigError, match="run config rounds must be a int"):
        from_run_config({"rounds": "3"})
    with pytest.raises(ConfigError, match="unknown run settings"):
        write_app(tmp_path / "other", epochs=3)


def test_the_hand_written_servers_options_name_their_flower_replacement():
    runner = CliRunner()
    short = runner.invoke(main, ["federated", "--clients", "2", "--min-clients", "3"])
    assert short.exit_code == 2 and "--min-clients" in short.output and "[1, 2]" in short.output
    serve = runner.invoke(main, ["federated", "--serve", "127.0.0.1:1"])
    assert serve.exit_code == 2 and "--serve belonged to the hand-written gRPC server" in serve.output
    assert "flower-superlink" in serve.output
    tls = runner.invoke(main, ["federated", "--ssl-certfile", __file__])
    assert tls.exit_code == 2 and "flower-superlink --ssl-certfile" in tls.output
    sampled = runner.invoke(main, ["federated", "--clients", "4", "--clients-per-round", "5"])
    assert sampled.exit_code == 2 and "--clients-per-round" in sampled.output


# ---- deployment: a SuperLink and two SuperNodes on loopback, TLS and node authentication ----------
def _tls_certificates() -> tuple[bytes, bytes, bytes]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (PEM: CA certificate,
    server certificate, server key), made here and never written to the repository."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, key, issuer, issuer_key, ca):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bnnzoo test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, True)
    cert = certificate(server_name, server_key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    key = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key


def _node_keys() -> tuple[bytes, bytes]:
    """A SuperNode's key pair for Flower's node authentication: the private key (OpenSSH PEM, as
    ``flower-supernode --auth-supernode-private-key`` reads it) and the public key (OpenSSH, as
    ``flwr supernode register`` reads it)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


DEPLOYMENT_SECONDS = 180  # the bound on the whole deployment test (about 75 s alone, 115 s on a busy machine)


@pytest.mark.slow  # about 75 s: every message starts a flwr-clientapp process (torch, Pyro and Flower imported)
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="needs Flower's flower-superlink")
def test_a_superlink_with_two_authenticated_supernodes_over_tls_runs_two_rounds(tmp_path):
    """Flower's own deployment on loopback: a SuperLink with TLS and SuperNode authentication, two
    SuperNodes (each registered with ``flwr supernode register``, holding half of Boston's training
    split, trusting the test CA), and ``flwr run`` of the Flower App that ``bnnzoo federated
    --write-app`` writes; the ServerApp completes 2 rounds with both clients and writes its
    results. The whole test is bounded (:data:`DEPLOYMENT_SECONDS`)."""
    deadline = time.monotonic() + DEPLOYMENT_SECONDS
    ca, cert, key = _tls_certificates()
    files = {"ca.pem": ca, "server.pem": cert, "server.key": key}
    for k in range(2):
        files[f"node{k}.key"], files[f"node{k}.pub"] = _node_keys()
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    link, *node_ports = _free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\nroot-certificates = "{tmp_path / "ca.pem"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    written = CliRunner().invoke(main, ["federated", "--clients", "2", "--rounds", "2", "--hidden", "8", "--set",
                                        "keep=0.5", "--eval-every", "1", "--write-app", str(tmp_path / "app"),
                                        "--out", str(results)])
    assert written.exit_code == 0, written.output
    bin_dir = os.path.dirname(sys.executable)
    procs = []

    def start(*args, log):
        # each in a session of its own: ending it ends the ServerApp / ClientApp processes it started
        procs.append(subprocess.Popen([os.path.join(bin_dir, args[0]), *args[1:]], env=env, cwd=tmp_path,
                                      stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def remaining():
        return max(1.0, deadline - time.monotonic())

    try:
        start("flower-superlink", "--ssl-ca-certfile", str(tmp_path / "ca.pem"), "--ssl-certfile",
              str(tmp_path / "server.pem"), "--ssl-keyfile", str(tmp_path / "server.key"), "--host", "127.0.0.1",
              "--port", str(link), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
              "--database", str(tmp_path / "state.db"), log="superlink.log")
        for k in range(2):  # the control API answers once the SuperLink is up: retry the first registration
            while True:
                reg = subprocess.run([os.path.join(bin_dir, "flwr"), "supernode", "register",
                                      str(tmp_path / f"node{k}.pub"), "loopback"], env=env, capture_output=True,
                                     text=True, timeout=remaining())
                if reg.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            assert reg.returncode == 0, reg.stdout + reg.stderr + (tmp_path / "superlink.log").read_text()
        for k in range(2):
            start("flower-supernode", "--superlink", f"127.0.0.1:{link}", "--root-certificates",
                  str(tmp_path / "ca.pem"), "--auth-supernode-private-key", str(tmp_path / f"node{k}.key"),
                  "--node-config", f"partition-id={k} num-partitions=2", "--port", str(node_ports[k]),
                  log=f"supernode{k}.log")
        run = subprocess.run([os.path.join(bin_dir, "flwr"), "run", str(tmp_path / "app"), "loopback", "--stream"],
                             env=env, capture_output=True, text=True, timeout=remaining())
        logs = run.stdout + run.stderr
        assert run.returncode == 0 and "em-tdamp: 2 rounds done" in logs, logs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    record = json.loads((results / "history.json").read_text())
    assert record["history"]["round"] == [1, 2] and record["history"]["clients"] == [2, 2]
    assert record["failed_clients"] == {} and all(math.isfinite(v) for v in record["history"]["nmse"])
    assert sorted(record["rounds"][0]["answered"]) == [f"{name}/client-{k}" for k, name in
                                                       enumerate([socket.gethostname()] * 2)]
    assert TDAMPPosterior.load(results / "run").sparsity()["architecture"] == "13-4-1"
