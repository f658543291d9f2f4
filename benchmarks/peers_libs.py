"""The peer libraries of the ``peers`` suite (:mod:`benchmarks.bench_peers`), each run in the
configuration its own README or examples recommend.

Every runner takes a :class:`benchmarks.bench_peers.PeerTask` (plus, for Laplace, the trained plain
Adam network) and returns one row: the test metrics of :func:`benchmarks.bench_peers.score`, the
epoch times against plain Adam epochs run on the same batches, the time to predict the test set and
the number of samples (forward passes or weight draws) its predictive uses, and the configuration.

The peers are optional (the ``bench`` extra of ``pyproject.toml``): each runner imports its library
when called, so that a missing library raises :class:`ImportError` there, which
:func:`benchmarks.bench_peers.run_method` records as "left out" with the error's text. Nothing here
changes a library: TyXe 0.0.2 is run through :class:`TyXe's guide <tyxe.guides.AutoNormal>` with
two accessors redefined in a subclass (see :func:`tyxe_guide_class`), never by patching Pyro.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings

import pyro
import pyro.distributions as dist
import pyro.util
import torch
import torch.nn.functional as F

#: posterior predictive samples of each peer, as its README or examples use them
BAYESIAN_TORCH_SAMPLES = 20  # bayesian-torch examples/main_bayesian_mnist.py: --num_monte_carlo 20
TYXE_SAMPLES = 32  # TyXe examples/classification.py: bnn.predict(x_test, num_predictions=32)

#: bayesian-torch's README ``const_bnn_prior_parameters`` (Reparameterization or Flipout is set per run)
BAYESIAN_TORCH_PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                        "moped_enable": False, "moped_delta": 0.5}

#: TyXe's guide scale in its classification example (``partial(tyxe.guides.AutoNormal, init_scale=0.01)``)
TYXE_INIT_SCALE = 0.01

#: examples per Laplace prediction call: the all-weights GLM predictive builds per-example Jacobians
#: (outputs x parameters), so the test set goes through in small chunks to bound memory
LAPLACE_PREDICT_CHUNK = 20


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish its queued work; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


# ---- bayesian-torch ---------------------------------------------------------------------------------
def _bayesian_torch_network(task, layer_type: str):
    """The task's plain network (seeded with the task's seed) converted by bayesian-torch's
    ``dnn_to_bnn`` with the README prior and posterior initialisation and ``layer_type``, on the
    task's device; returns it and the conversion's parameters."""
    from bayesian_torch.models.dnn_to_bnn import (
        dnn_to_bnn,  # lazy: optional peer library
    )

    torch.manual_seed(task.seed)
    net = task.torch_network()
    params = {**BAYESIAN_TORCH_PRIOR, "type": layer_type}
    dnn_to_bnn(net, params)
    return net.to(task.device), params


def bayesian_torch(task, layer_type: str) -> dict:
    """bayesian-torch 0.5: the plain network converted with ``dnn_to_bnn`` (README prior and posterior
    initialisation, ``layer_type`` "Reparameterization" or "Flipout"), trained with Adam on
    ``cross_entropy + get_kl_loss / N`` (one weight sample per step, as the README's training snippet;
    KL over the training-set size N as ``examples/main_bayesian_mnist.py``), predicting with the mean
    softmax of :data:`BAYESIAN_TORCH_SAMPLES` forward passes in ``eval`` mode (README testing snippet)."""
    from bayesian_torch.models.dnn_to_bnn import (
        get_kl_loss,  # lazy: optional peer library
    )

    net, params = _bayesian_torch_network(task, layer_type)
    optimizer = torch.optim.Adam(net.parameters(), lr=task.lr)
    n = len(task.x_train)

    def epoch(batches):
        net.train()
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(task.x_train[idx]), task.y_train[idx]) + get_kl_loss(net) / n
            loss.backward()
            optimizer.step()

    seconds, plain = task.train_paired(epoch)

    @torch.no_grad()
    def predict():
        net.eval()
        total = None
        for _ in range(BAYESIAN_TORCH_SAMPLES):
            p = torch.cat([torch.softmax(net(x), -1) for x in task.test_chunks()])
            total = p if total is None else total + p
        return total / BAYESIAN_TORCH_SAMPLES

    probs, predict_seconds = timed(predict, task.device)
    return task.row(probs, seconds, plain, predict_seconds, BAYESIAN_TORCH_SAMPLES,
                    predictive=f"mean softmax of {BAYESIAN_TORCH_SAMPLES} forward passes",
                    config={**params, "loss": "cross_entropy + kl / N", "train_samples": 1})


# ---- TyXe -------------------------------------------------------------------------------------------
def tyxe_guide_class():
    """TyXe's mean-field guide class usable with the installed Pyro, and a note on how it was obtained.

    TyXe 0.0.2's ``tyxe.guides.AutoNormal`` reads its variational parameters back with
    ``pyro.util.deep_getattr``, which Pyro 1.9 removed (every fit fails with ``AttributeError``). Where
    Pyro lacks it, this returns a subclass that redefines only those two accessors, ``get_loc`` and
    ``get_scale``, resolving the same dotted attribute path with :func:`getattr`: the parameters are
    stored by TyXe itself (``pyro.infer.autoguide.guides.deep_setattr``, still in Pyro 1.9), so the
    guide, its parameters and its distributions are unchanged. Pyro is not modified."""
    import tyxe  # lazy: optional peer library

    if hasattr(pyro.util, "deep_getattr"):
        return tyxe.guides.AutoNormal, "none needed: pyro.util.deep_getattr exists"

    class AutoNormal(tyxe.guides.AutoNormal):
        """BENCHMARK SHIM (TyXe 0.0.2 on Pyro >= 1.9): ``get_loc``/``get_scale`` without
        ``pyro.util.deep_getattr``."""

        def get_loc(self, site_name):
            return functools.reduce(getattr, f"{site_name}.loc".split("."), self)

        def get_scale(self, site_name):
            return functools.reduce(getattr, f"{site_name}.scale".split("."), self)

    return AutoNormal, ("subclass of tyxe.guides.AutoNormal redefining get_loc/get_scale with getattr, "
                        "because pyro.util.deep_getattr (called by TyXe 0.0.2) is absent from this Pyro")


def tyxe_mean_field(task) -> dict:
    """TyXe 0.0.2 mean-field VI as in its README and ``examples/classification.py``: an
    ``IIDPrior(Normal(0, 1))`` on every weight and bias, a ``Categorical`` likelihood over the N
    training examples, the ``AutoNormal`` guide with ``init_scale=0.01`` and its means at the
    network's PyTorch initialisation (``PretrainedInitializer.from_net``, as TyXe's MNIST example
    ``examples/vcl.py``; the guide's own default draws them from the N(0, 1) prior),
    ``pyro.optim.Adam`` and local reparameterisation for both fitting and prediction; the predictive
    averages the class probabilities of :data:`TYXE_SAMPLES` forward passes
    (``bnn.predict(..., num_predictions=32)``)."""
    import tyxe  # lazy: optional peer library

    guide_class, shim = tyxe_guide_class()
    pyro.clear_param_store()
    torch.manual_seed(task.seed)
    pyro.set_rng_seed(task.seed)
    net = task.torch_network().to(task.device)
    prior = tyxe.priors.IIDPrior(dist.Normal(torch.tensor(0.0, device=task.device),
                                             torch.tensor(1.0, device=task.device)))
    likelihood = tyxe.likelihoods.Categorical(len(task.x_train))
    # guide means start at the network's PyTorch initialisation, as TyXe's MNIST example (examples/vcl.py)
    init_loc = tyxe.guides.PretrainedInitializer.from_net(net, prefix="net")
    bnn = tyxe.VariationalBNN(net, prior, likelihood,
                              functools.partial(guide_class, init_scale=TYXE_INIT_SCALE, init_loc_fn=init_loc))
    optim = pyro.optim.Adam({"lr": task.lr})

    def epoch(batches):
        # one pass over these batches; the same pyro optimiser object keeps Adam's state across calls
        with tyxe.poutine.local_reparameterization():
            bnn.fit([(task.x_train[idx], task.y_train[idx]) for idx in batches], optim, 1)

    seconds, plain = task.train_paired(epoch)

    def predict():
        with tyxe.poutine.local_reparameterization():
            logits = torch.cat([bnn.predict(x, num_predictions=TYXE_SAMPLES) for x in task.test_chunks()])
        return torch.softmax(logits, -1)  # TyXe aggregates to log mean probabilities

    probs, predict_seconds = timed(predict, task.device)
    pyro.clear_param_store()
    return task.row(probs, seconds, plain, predict_seconds, TYXE_SAMPLES,
                    predictive=f"mean probabilities of {TYXE_SAMPLES} forward passes, local reparameterisation",
                    config={"prior": "IIDPrior(Normal(0, 1))", "guide": "AutoNormal", "init_scale": TYXE_INIT_SCALE,
                            "init_loc_fn": "PretrainedInitializer.from_net (PyTorch default initialisation)",
                            "local_reparameterization": True, "closed_form_kl": True, "shim": shim})


# ---- laplace-torch ----------------------------------------------------------------------------------
def _laplace_variant(variant: str) -> tuple[dict, dict]:
    """``(Laplace keyword options, their description for the result)`` of a laplace-torch variant:
    "last-layer-kron" (the library's defaults) or "all-diag" (all weights, diagonal, BackPACK)."""
    if variant == "last-layer-kron":
        return {}, {"subset_of_weights": "last_layer", "hessian_structure": "kron", "backend": "library default"}
    if variant == "all-diag":
        from laplace.curvature import BackPackGGN  # lazy: optional peer library

        return ({"subset_of_weights": "all", "hessian_structure": "diag", "backend": BackPackGGN},
                {"subset_of_weights": "all", "hessian_structure": "diag", "backend": "BackPackGGN"})
    raise ValueError(f"unknown Laplace variant {variant!r}")


def laplace(task, adam_module: torch.nn.Module, variant: str) -> dict:
    """laplace-torch 0.3, post hoc on a copy of the plain Adam network ``adam_module``.

    ``variant`` "last-layer-kron": ``Laplace(model, "classification")`` with the library's defaults
    (last layer, Kronecker-factored GGN). "all-diag": ``subset_of_weights="all"``,
    ``hessian_structure="diag"`` with the ``BackPackGGN`` backend. Both as the README's usage:
    ``la.fit(train_loader)``, then ``la.optimize_prior_precision(pred_type="glm", method="marglik",
    link_approx="probit")`` (the library's default tuning method, marginal likelihood, which needs no
    validation set) and the linearised ``glm`` predictive with the ``probit`` link (one closed-form
    pass, no sampling: ``samples`` is 0). There is no training epoch: the row's ``fit_seconds`` is the
    Hessian fit plus the prior-precision optimisation, also given in plain-Adam epochs."""
    from laplace import Laplace  # lazy: optional peer library
    from torch.utils.data import DataLoader, TensorDataset

    options, config = _laplace_variant(variant)
    model = copy.deepcopy(adam_module).eval()
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=task.batch_size)
    with warnings.catch_warnings():
        # laplace reminds that link_approx defaults to probit; BackPACK's hooks warn that inputs need no grad
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(task.seed)
        la = Laplace(model, "classification", **options)

        def fit():
            la.fit(loader)
            la.optimize_prior_precision(pred_type="glm", method="marglik", link_approx="probit")

        _, fit_seconds = timed(fit, task.device)

        def predict():
            return torch.cat([la(x, pred_type="glm", link_approx="probit")
                              for x in task.test_chunks(LAPLACE_PREDICT_CHUNK)]).detach()

        probs, predict_seconds = timed(predict, task.device)
    prior = la.prior_precision.detach().flatten()
    config.update(prior_precision_tuning="marglik", predictive="glm, probit",
                  backend_class=type(la.backend).__name__, laplace_class=type(la).__name__,
                  prior_precision=prior.tolist() if prior.numel() <= 10 else {"mean": float(prior.mean()),
                                                                              "numel": prior.numel()})
    return task.posthoc_row(probs, fit_seconds, predict_seconds, 0,
                            predictive="linearised (GLM) predictive, probit approximation: closed form",
                            config=config)


# ---- regression (the Boston task, :mod:`benchmarks.bench_peers_boston`) ----------------------------
#: Adam steps on (log prior precision, log sigma_noise) by the negative log marginal likelihood, and
#: their learning rate, as laplace-torch's ``examples/regression_example.py`` (``n_epochs = 1000``,
#: ``torch.optim.Adam([log_prior, log_sigma], lr=1e-1)``)
LAPLACE_HYPER_STEPS = 1000
LAPLACE_HYPER_LR = 0.1


def bayesian_torch_regression(task, layer_type: str) -> dict:
    """bayesian-torch 0.5 on a regression task: the plain network converted with ``dnn_to_bnn`` as
    :func:`bayesian_torch` (README prior, ``layer_type``), trained with Adam on the Gaussian negative
    log likelihood of the standardised targets with one learned homoscedastic noise sd (its log, a
    parameter starting at 0, i.e. sd 1 in standardised units; bayesian-torch ships no regression
    example, so the noise is learned jointly, as the ELBO does) plus ``get_kl_loss / N``; predictive:
    the Gaussian mixture over :data:`BAYESIAN_TORCH_SAMPLES` forward passes in ``eval`` mode, each
    with the learned noise."""
    from bayesian_torch.models.dnn_to_bnn import (
        get_kl_loss,  # lazy: optional peer library
    )

    net, params = _bayesian_torch_network(task, layer_type)
    log_noise = torch.zeros((), device=task.device, requires_grad=True)
    optimizer = torch.optim.Adam([*net.parameters(), log_noise], lr=task.lr)
    n = len(task.x_train)

    def epoch(batches):
        net.train()
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            out = net(task.x_train[idx]).squeeze(-1)
            nll = -dist.Normal(out, log_noise.exp()).log_prob(task.y_train[idx]).mean()
            (nll + get_kl_loss(net) / n).backward()
            optimizer.step()

    seconds, plain = task.train_paired(epoch)

    @torch.no_grad()
    def predict():
        net.eval()
        return torch.stack([net(task.x_test).squeeze(-1) for _ in range(BAYESIAN_TORCH_SAMPLES)])

    loc, predict_seconds = timed(predict, task.device)
    noise = log_noise.detach().exp()
    return task.row((loc, noise), seconds, plain, predict_seconds, BAYESIAN_TORCH_SAMPLES,
                    predictive=f"Gaussian mixture over {BAYESIAN_TORCH_SAMPLES} forward passes, learned noise",
                    config={**params, "loss": "gaussian nll (learned noise sd) + kl / N", "train_samples": 1,
                            "noise_sd_standardised": float(noise)})


def tyxe_regression(task) -> dict:
    """TyXe 0.0.2 mean-field VI on a regression task, as :func:`tyxe_mean_field` (``IIDPrior(Normal(0,
    1))``, ``AutoNormal`` with ``init_scale=0.01`` and means at the PyTorch initialisation, local
    reparameterisation, ``pyro.optim.Adam``) with the README's regression likelihood
    ``tyxe.likelihoods.HomoskedasticGaussian(N, scale=...)``, whose scale is here a ``PyroParam``
    (positive, starting at 1 in standardised units) so that it is learned with the guide, as the
    class's documentation offers (the README fixes it at the toy data's known 0.1); predictive: the
    Gaussian mixture over :data:`TYXE_SAMPLES` forward passes (``bnn.predict(x, num_predictions=32,
    aggregate=False)``), each with the learned scale."""
    import tyxe  # lazy: optional peer library
    from pyro.nn import PyroParam
    from torch.distributions import constraints

    guide_class, shim = tyxe_guide_class()
    pyro.clear_param_store()
    torch.manual_seed(task.seed)
    pyro.set_rng_seed(task.seed)
    net = task.torch_network().to(task.device)
    prior = tyxe.priors.IIDPrior(dist.Normal(torch.tensor(0.0, device=task.device),
                                             torch.tensor(1.0, device=task.device)))
    likelihood = tyxe.likelihoods.HomoskedasticGaussian(
        len(task.x_train), scale=PyroParam(torch.tensor(1.0, device=task.device), constraint=constraints.positive))
    init_loc = tyxe.guides.PretrainedInitializer.from_net(net, prefix="net")
    bnn = tyxe.VariationalBNN(net, prior, likelihood,
                              functools.partial(guide_class, init_scale=TYXE_INIT_SCALE, init_loc_fn=init_loc))
    optim = pyro.optim.Adam({"lr": task.lr})
    y = task.y_train.unsqueeze(-1)  # the likelihood's event dimension is the network's output

    def epoch(batches):
        with tyxe.poutine.local_reparameterization():
            bnn.fit([(task.x_train[idx], y[idx]) for idx in batches], optim, 1)

    seconds, plain = task.train_paired(epoch)

    @torch.no_grad()
    def predict():
        with tyxe.poutine.local_reparameterization():
            return bnn.predict(task.x_test, num_predictions=TYXE_SAMPLES, aggregate=False).squeeze(-1)

    loc, predict_seconds = timed(predict, task.device)
    noise = likelihood.scale.detach()
    pyro.clear_param_store()
    return task.row((loc, noise), seconds, plain, predict_seconds, TYXE_SAMPLES,
                    predictive=f"Gaussian mixture over {TYXE_SAMPLES} forward passes, learned noise",
                    config={"prior": "IIDPrior(Normal(0, 1))", "guide": "AutoNormal", "init_scale": TYXE_INIT_SCALE,
                            "likelihood": "HomoskedasticGaussian, scale a PyroParam (learned)",
                            "noise_sd_standardised": float(noise), "local_reparameterization": True, "shim": shim})


def laplace_regression(task, adam_module: torch.nn.Module, variant: str) -> dict:
    """laplace-torch 0.3 on a regression task, post hoc on a copy of the plain Adam network, as the
    README's regression usage and ``examples/regression_example.py``: ``Laplace(model, "regression",
    ...)``, ``la.fit(train_loader)``, then :data:`LAPLACE_HYPER_STEPS` Adam steps (learning rate
    :data:`LAPLACE_HYPER_LR`) on the log prior precision and log ``sigma_noise`` (both starting at 1)
    minimising ``-la.log_marginal_likelihood(prior_prec, sigma_noise)``; predictive: the linearised
    ``glm`` predictive, ``f_mu, f_var = la(x, pred_type="glm")``, Gaussian with variance ``f_var +
    sigma_noise**2`` (closed form). ``variant`` as :func:`laplace` ("last-layer-kron", "all-diag")."""
    from laplace import Laplace  # lazy: optional peer library
    from torch.utils.data import DataLoader, TensorDataset

    options, config = _laplace_variant(variant)
    model = copy.deepcopy(adam_module).eval()
    loader = DataLoader(TensorDataset(task.x_train, task.y_train.unsqueeze(-1)), batch_size=task.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(task.seed)
        la = Laplace(model, "regression", **options)

        def fit():
            la.fit(loader)
            log_prior = torch.ones(1, requires_grad=True, device=task.device)
            log_sigma = torch.ones(1, requires_grad=True, device=task.device)
            hyper = torch.optim.Adam([log_prior, log_sigma], lr=LAPLACE_HYPER_LR)
            for _ in range(LAPLACE_HYPER_STEPS):
                hyper.zero_grad()
                (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
                hyper.step()

        _, fit_seconds = timed(fit, task.device)

        def predict():
            f_mu, f_var = la(task.x_test, pred_type="glm")
            return f_mu.detach().reshape(1, -1), (f_var.detach().reshape(1, -1) + la.sigma_noise.detach() ** 2).sqrt()

        (loc, scale), predict_seconds = timed(predict, task.device)
    config.update(hyper_tuning=f"marglik, Adam lr {LAPLACE_HYPER_LR}, {LAPLACE_HYPER_STEPS} steps",
                  predictive="glm", laplace_class=type(la).__name__,
                  prior_precision=float(la.prior_precision.detach().flatten()[0]),
                  noise_sd_standardised=float(la.sigma_noise.detach().flatten()[0]))
    return task.posthoc_row((loc, scale), fit_seconds, predict_seconds, 0,
                            predictive="linearised (GLM) Gaussian predictive plus sigma_noise: closed form",
                            config=config)
