"""Federated EM-TDAMP on Flower: the aggregation formulas against closed forms, the partitions and
the statistics round, the clients' local epochs, and real runs on loopback (server here, client
processes)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import multiprocessing as mp

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
from bnnzoo.federated.client import StandardizedClient, local_passes
from bnnzoo.federated.fedavg import get_weights
from bnnzoo.federated.handshake import (
    FederatedError,
    mismatches,
    resolve_min_clients,
    run_spec,
)
from bnnzoo.federated.run import (
    FederatedServer,
    _client_process,
    build_posterior,
    client_spec,
    free_port,
    make_client,
    run_federated,
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


def _in_process_round(strategy, clients, blob, rnd):
    """One round without Flower: every client's fit on the global arrays, then the aggregation."""
    arrays = codec.to_ndarrays(strategy.guide.state(), strategy.global_layout)
    config = {"stage": "tdamp", "epochs": 1, "round": rnd, "num_data": strategy.num_data,
              "weighting": strategy.weighting, "standardizer": blob}
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
    clients = [make_client(client_spec("em-tdamp", server.config, "cpu", k), data.x_train[p], data.y_train[p])
               for k, p in enumerate(parts)]
    std = standardizer_from_moments([moments(c.x_raw, c.y_raw, "regression") for c in clients], "regression", False)
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
    client stops with DivergenceError (Flower reports it to the server as the round's failure)."""
    data = load_dataset("boston", split=0).subset(120, 30, seed=0)
    server = build_posterior(data, seed=0, network={"arch": "mlp", "hidden": [8]})
    tdamp = make_client(client_spec("em-tdamp", server.config, "cpu", 0), data.x_train, data.y_train)
    fedavg = make_client(client_spec("fedavg", server.config, "cpu", 0), data.x_train, data.y_train)
    blob = encode(standardizer_from_moments([moments(data.x_train, data.y_train, "regression")], "regression", False))
    config = {"stage": "tdamp", "epochs": 3, "round": 1, "num_data": 120, "weighting": "geometric",
              "standardizer": blob}
    _, n, metrics = tdamp.fit(codec.to_ndarrays(server.guide.state(), codec.global_layout(server.net)), config)
    assert n == 120 and len(tdamp.history.loss) == 3 and len(tdamp.history.epoch_seconds) == 3
    # the reply's statistics add up over the round's epochs; each epoch's loss is its own part of them
    assert metrics["log_evidence"] == pytest.approx(-sum(tdamp.history.loss) / 3, rel=1e-5)

    weights = get_weights(fedavg.module)
    config = {"stage": "fedavg", "epochs": 2, "round": 1, "standardizer": blob}
    _, _, first = fedavg.fit(weights, config)
    _, _, second = fedavg.fit(weights, {**config, "round": 2})
    assert len(fedavg.history.loss) == 4 and all(t > 0 for t in fedavg.history.epoch_seconds)
    assert (first["train_loss"], second["train_loss"]) == (fedavg.history.loss[1], fedavg.history.loss[3])
    with pytest.raises(DivergenceError, match="FedAvg client"):
        fedavg.fit([w * np.nan for w in weights], {**config, "round": 3})


# ---- runs on loopback ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def boston():
    return load_dataset("boston", split=0)


def test_two_client_loopback_run_completes_and_improves(boston):
    run = run_federated(boston, num_clients=2, rounds=4, seed=0, keep=0.4)
    h = run.history
    assert h["eval_round"] == [1, 2, 3, 4] and h["clients"] == [2, 2, 2, 2]
    assert h["nmse"][-1] < h["nmse"][0]
    assert h["loss"][-1] < h["loss"][0]  # the clients' log evidence of their passes improves too
    assert isinstance(run.model, TDAMPPosterior) and run.model.sparsity()["architecture"] == "13-20-1"
    m = run.model.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert m["rmse"] ** 2 / float(boston.y_test.var()) < 0.5
    assert sum(run.partition_sizes) == len(boston.y_train)


def test_a_client_that_disconnects_mid_round_does_not_stop_the_server(boston):
    run = run_federated(boston, num_clients=3, rounds=3, seed=1, partition="label-skew", crash=(0, 2), min_clients=2)
    h = run.history
    assert list(run.failed_clients) == ["client 0"] and run.failed_clients["client 0"].startswith("round 2:")
    assert h["round"] == [1, 2, 3]
    assert h["clients"][0] == 3 and h["clients"][1] == 2 and h["clients"][2] == 2
    assert h["failures"][1] == 1
    assert all(math.isfinite(v) for v in h["nmse"])


def test_cli_runs_the_fedavg_baseline_in_the_same_harness():
    result = CliRunner().invoke(main, ["federated", "--method", "fedavg", "--clients", "2", "--rounds", "3",
                                       "--eval-every", "1", "--local-epochs", "2"])
    assert result.exit_code == 0, result.output
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


# ---- honest rounds: the handshake, the minimum per round, TLS, clear failures -------------------
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


def _serve(server, clients, certificates=None, timeout=60.0, client_tls=True):
    """Serve ``server`` on a free loopback port, with TLS when given ``certificates``, and one forked
    process per client ``(spec, x, y, crash_round)`` (trusting the CA of ``certificates`` unless
    ``client_tls`` is false); returns the model (or the raised error) and the clients' exit codes."""
    address = f"127.0.0.1:{free_port()}"
    root = None if certificates is None or not client_tls else certificates[0]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(address, spec, x, y, 1, True, crash, root, timeout)) for spec, x, y, crash in clients]
    for proc in procs:
        proc.start()
    try:
        try:
            outcome = server.serve(address, timeout, certificates)
        except FederatedError as err:
            outcome = err
    finally:
        for proc in procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return outcome, [proc.exitcode for proc in procs]


@pytest.mark.parametrize("min_clients", [2, 3])
def test_a_tls_run_names_a_misconfigured_and_a_killed_client(boston, capfd, min_clients):
    """Four clients over TLS: client 2 was started with another hidden width, client 3 dies in round
    2. The handshake refuses client 2 by name (it exits non-zero saying why, without a traceback);
    with a minimum of 2 the run finishes with clients 0 and 1 and names client 3 as failed in round
    2; with a minimum of 3, round 2 falls short and the run fails loudly, naming both."""
    network = {"arch": "mlp", "hidden": [8]}
    reports = []
    server = FederatedServer(boston, num_clients=4, rounds=3, network=network, min_clients=min_clients, keep=0.5,
                             report=reports.append)
    other = build_posterior(boston, network={"arch": "mlp", "hidden": [9]}, keep=0.5)
    parts = iid(len(boston.y_train), 4, seed=0)
    specs = [server.client_spec(k, name=f"client {k}") for k in range(4)]
    specs[2] = client_spec("em-tdamp", other.config, "cpu", 2, name="client 2")
    clients = [(spec, boston.x_train[p], boston.y_train[p], 2 if k == 3 else None)
               for k, (spec, p) in enumerate(zip(specs, parts))]
    outcome, codes = _serve(server, clients, _tls_certificates())
    err = capfd.readouterr().err
    assert list(server.roster.refused) == ["client 2"]
    assert server.roster.refused["client 2"] == "network mlp-13-9-1, the server's mlp-13-8-1"
    assert list(server.roster.failed) == ["client 3"] and server.roster.failed["client 3"].startswith("round 2: ")
    assert "client 2: the server at 127.0.0.1" in err and "refused this client: network mlp-13-9-1" in err
    assert "Traceback" not in err
    assert codes[2] == 2 and codes[3] == 3  # refused; killed
    assert any("refused client 'client 2'" in r for r in reports) and any("'client 3' failed" in r for r in reports)
    if min_clients == 2:
        assert isinstance(outcome, TDAMPPosterior), outcome
        assert server.history["clients"] == [3, 2, 2] and server.history["eval_round"] == [1, 2, 3]
        assert all(math.isfinite(v) for v in server.history["nmse"])
        assert codes[:2] == [0, 0]
    else:
        assert isinstance(outcome, FederatedError)
        message = str(outcome)
        assert message.startswith("round 2: 2 of the 3 clients asked answered, fewer than the minimum 3")
        assert "client 3: round 2: " in message and "client 2: refused (network mlp-13-9-1" in message
        assert server.history["eval_round"] == [1]  # nothing evaluated after the short round
        assert codes[:2] == [2, 2] and err.count("the server stopped the run: round 2") == 2


def test_a_server_waits_reporting_progress_and_refuses_a_wrong_token(boston, capfd):
    """One of two clients connects, with the wrong token: the server reports the waiting, starts
    with it when the wait times out (the minimum is 1), refuses it in the handshake and fails with
    no client left; the client says the server ended the run before its first round."""
    reports = []
    server = FederatedServer(boston, num_clients=2, rounds=2, network={"arch": "mlp", "hidden": [4]}, min_clients=1,
                             token="s3cret", wait_timeout=3.0, report_every=1.0, report=reports.append)
    spec = server.client_spec(0, name="intruder", token="guess")
    outcome, codes = _serve(server, [(spec, boston.x_train[:100], boston.y_train[:100], None)])
    assert any(r.startswith("waiting for clients: ") and "of 2 connected" in r for r in reports)
    assert any(r.startswith("starting with 1 of 2 clients after") for r in reports)
    assert server.roster.refused == {"intruder": "wrong or missing token"}
    assert isinstance(outcome, FederatedError)
    assert str(outcome).startswith("the handshake and statistics round: 0 of the 1 clients asked were accepted")
    assert codes == [2] and "ended the run before this client's first round" in capfd.readouterr().err


def test_a_server_whose_clients_never_come_fails_naming_the_count(boston):
    server = FederatedServer(boston, num_clients=3, rounds=1, network={"arch": "mlp", "hidden": [4]},
                             min_clients=0.5, wait_timeout=0.5, report_every=0.2)
    outcome, _ = _serve(server, [])
    assert isinstance(outcome, FederatedError)
    assert str(outcome).startswith("only 0 of 3 clients connected in 0 s; the run needs at least 2 (")


def test_a_client_without_tls_cannot_join_a_tls_server(boston, capfd):
    server = FederatedServer(boston, num_clients=1, rounds=1, network={"arch": "mlp", "hidden": [4]}, wait_timeout=2)
    spec = server.client_spec(0, name="plain")
    outcome, codes = _serve(server, [(spec, boston.x_train, boston.y_train, None)], _tls_certificates(), timeout=1.0,
                            client_tls=False)
    assert isinstance(outcome, FederatedError) and str(outcome).startswith("only 0 of 1 clients connected")
    err = capfd.readouterr().err
    assert codes == [2] and "plain: the connection to the server at 127.0.0.1:" in err
    assert "whether it uses TLS (then give --root-certificates)" in err and "Traceback" not in err


def test_min_clients_counts_and_fractions():
    assert resolve_min_clients(None, 4) == 4 and resolve_min_clients(3, 4) == 3
    assert resolve_min_clients(0.5, 4) == 2 and resolve_min_clients(0.6, 4) == 3 and resolve_min_clients(1.0, 4) == 4
    for bad in (0, 5, 0.0, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="min_clients"):
            resolve_min_clients(bad, 4)


def test_the_handshake_names_every_difference(boston):
    server = build_posterior(boston, network={"arch": "mlp", "hidden": [8]}, keep=0.5)
    same = build_posterior(boston, network={"arch": "mlp", "hidden": [8]}, keep=0.3, seed=4)  # server-side options
    other = build_posterior(boston, network={"arch": "mlp", "hidden": [8, 4]}, damping=0.5, batch_size=64)
    assert mismatches(run_spec("em-tdamp", server), run_spec("em-tdamp", same)) == []
    assert mismatches(run_spec("em-tdamp", server), run_spec("fedavg", other)) == [
        'method "fedavg", the server\'s "em-tdamp"', "network mlp-13-8-4-1, the server's mlp-13-8-1",
        "option guide.damping 0.5, the server's 0.8", "option train.batch_size 64, the server's 32"]


def test_a_client_pointed_at_a_closed_port_says_so():
    port = free_port()
    result = CliRunner().invoke(main, ["federated-client", "--server", f"127.0.0.1:{port}", "--timeout", "0.5"])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert f"cannot reach the server at 127.0.0.1:{port}" in result.output and "Traceback" not in result.output


def test_bad_server_options_are_refused_before_any_work(tmp_path):
    runner = CliRunner()
    short = runner.invoke(main, ["federated", "--clients", "2", "--min-clients", "3"])
    assert short.exit_code == 2 and "--min-clients" in short.output and "[1, 2]" in short.output
    half_tls = runner.invoke(main, ["federated", "--serve", "127.0.0.1:1", "--ssl-certfile", __file__])
    assert half_tls.exit_code == 2 and "--ssl-ca-certfile" in half_tls.output
    empty = tmp_path / "token"
    empty.write_text("\n")
    no_token = runner.invoke(main, ["federated", "--token-file", str(empty)])
    assert no_token.exit_code == 2 and "is empty" in no_token.output


def test_cli_server_with_tls_and_token_fails_when_a_client_runs_another_network(boston, tmp_path):
    """``bnnzoo federated --serve`` with TLS and a token, two clients of which one runs another
    hidden width: the handshake leaves one client, fewer than all (the default minimum), so the
    command fails naming the refused client and its network instead of reporting the prior's metrics."""
    files = dict(zip(("ca.pem", "server.pem", "server.key", "token"), (*_tls_certificates(), b"s3cret\n")))
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    address = f"127.0.0.1:{free_port()}"
    good = build_posterior(boston, network={"arch": "mlp", "hidden": [6]})
    bad = build_posterior(boston, network={"arch": "mlp", "hidden": [7]})
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(address, client_spec("em-tdamp", post.config, "cpu", k, name=f"host-{k}", token="s3cret"),
                               boston.x_train[k::2], boston.y_train[k::2], 1, True, None, files["ca.pem"], 30.0))
             for k, post in enumerate((good, bad))]
    for proc in procs:
        proc.start()
    try:
        result = CliRunner().invoke(main, [
            "federated", "--serve", address, "--clients", "2", "--rounds", "2", "--hidden", "6",
            "--ssl-ca-certfile", str(tmp_path / "ca.pem"), "--ssl-certfile", str(tmp_path / "server.pem"),
            "--ssl-keyfile", str(tmp_path / "server.key"), "--token-file", str(tmp_path / "token"),
            "--wait-timeout", "30"])
    finally:
        for proc in procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.terminate()
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: the handshake and statistics round: 1 of the 2 clients asked were accepted")
    assert "host-1: refused (network mlp-13-7-1, the server's mlp-13-6-1)" in last
    assert "TLS, token required" in result.output and "nmse" not in result.output
    assert [p.exitcode for p in procs] == [2, 2]
