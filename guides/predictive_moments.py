"""The posterior predictive of a mean-field Gaussian weight posterior by moment propagation.

For weights ``w ~ N(M, V)`` independent of one another (a :class:`~bnnzoo.guides.MeanFieldNormal`
guide; pruned weights are point masses at zero, ``M = V = 0``; a :class:`~bnnzoo.guides.PointMass`
is the case ``V = 0``), the mean and variance of every unit are carried through a dense ReLU
network layer by layer (the forward pass of :mod:`bnnzoo.guides.moment_propagation`, which TDAMP
uses, reused here as it is):

    dense  (input mean m, var v):  p   = M m + M_b
                                   tau = V m^2 + (V + M^2) v + V_b      (local reparameterisation
                                                                         moments; exact given m, v)
    ReLU   (pre-activation N(p, tau)):  the exact mean and variance of max(0, z), z ~ N(p, tau)

Each step matches the first two moments exactly given independent Gaussian inputs. The one
approximation is that a layer's outputs are treated as independent Gaussians: with one hidden layer
the output mean and variance are exact (the hidden units of one example depend on disjoint weight
rows, so they are independent); deeper, the units of a hidden layer are correlated through the
shared units below them and non-Gaussian, and the propagated variance is an approximation.

What the output moments give:

- regression: the predictive mean ``p_L`` and variance ``tau_L + sigma^2`` (the likelihood's noise).
- classification: the logits' marginal ``N(p_L, tau_L)`` per class; the class probabilities
  ``E[softmax(z)]`` by the probit approximation (:func:`probit_softmax`), or, to the accuracy of
  Monte Carlo over weights, by quasi-Monte Carlo over the logits' Gaussian (:func:`sampled_softmax`)
  with the full covariance of the last layer's logits (:func:`output_moments` with
  ``full_covariance``).

Everything runs on the device and dtype of the inputs and weights; nothing is copied to the host.
"""

from __future__ import annotations

import math

import torch

from ..models.networks import Activation, Dense, Flatten, Network
from .delta import PointMass
from .meanfield import MeanFieldNormal
from .moment_propagation import linear_moments, relu_moments

#: the guide classes whose weights are independent Gaussians (a point mass: variance zero)
SUPPORTED_GUIDES = (MeanFieldNormal, PointMass)
#: ``lambda`` of the probit approximation ``softmax(mu / sqrt(1 + lambda var))`` (MacKay 1992)
PROBIT_LAMBDA = math.pi / 8


def check_network(net: Network) -> None:
    """Raise ``TypeError`` naming the first layer that moment propagation does not support: it
    supports dense layers, ReLU (and identity) activations and flattening only."""
    for layer in net.layers:
        if isinstance(layer, (Dense, Flatten)):
            continue
        if isinstance(layer, Activation) and layer.fn in ("relu", "identity"):
            continue
        what = f"the activation {layer.fn!r}" if isinstance(layer, Activation) else f"a {layer.kind} layer"
        raise TypeError(f"the moment-propagated predictive supports dense networks with ReLU activations "
                        f"(arch mlp, lenet-300-100); {net!r} has {what}")


def gaussian_weight_moments(guide) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor],
                                                     tuple[torch.Tensor, torch.Tensor]]]:
    """``{layer: ((w_mean, w_var), (b_mean, b_var))}`` of a guide whose weights are independent
    Gaussians, pruned entries zero in mean and variance (the point mass at zero they are drawn from).

    Only exactly :class:`~bnnzoo.guides.MeanFieldNormal` and :class:`~bnnzoo.guides.PointMass` are
    accepted; any other guide (a subclass included: ``LayerScaleMeanFieldNormal``'s weights are a
    Gaussian scale mixture) raises ``TypeError`` naming it.
    """
    kind = type(guide)
    if kind not in SUPPORTED_GUIDES:
        names = " or ".join(c.__name__ for c in SUPPORTED_GUIDES)
        raise TypeError(f"the moment-propagated predictive needs independent Gaussian weights ({names}); "
                        f"the posterior's guide is {kind.__name__}")
    out = {}
    for layer in guide.net.param_layers:
        pair = []
        for param in ("weight", "bias"):
            if kind is MeanFieldNormal:
                _, loc, var, _, _ = guide.masked_moments(layer.name, param)
            else:
                loc = guide.posterior_mean()[f"{layer.name}.{param}"]
                var = torch.zeros_like(loc)
            pair.append((loc.detach(), var.detach()))
        out[layer.name] = tuple(pair)
    return out


def output_moments(net: Network, x: torch.Tensor, moments, full_covariance: bool = False):
    """The mean and variance of the network's outputs for known inputs ``x`` (each ``(N, out)``)
    under independent Gaussian weights ``moments`` (:func:`gaussian_weight_moments`), by the layer
    by layer propagation of the module docstring.

    With ``full_covariance`` the third result is the outputs' covariance ``(N, out, out)`` given the
    last hidden layer's (independent) moments ``m, v``: ``M diag(v) M^T + diag(V m^2 + V v + V_b)``;
    the last layer's output units share their inputs, so their logits are correlated even though
    their weights are not. Its diagonal is the variance.
    """
    check_network(net)
    mean, var = x, None
    dense = [layer for layer in net.layers if isinstance(layer, Dense)]
    cov = None
    for layer in net.layers:
        if isinstance(layer, Dense):
            (w_mean, w_var), (b_mean, b_var) = moments[layer.name]
            if full_covariance and layer is dense[-1] and var is not None:
                # the rows of the last layer share the input's spread: Cov = M diag(v) M^T + diag(...)
                cov = torch.einsum("ki,ni,li->nkl", w_mean, var, w_mean)
            mean, var = linear_moments(mean, var, w_mean, w_var, b_mean, b_var)
            if cov is not None:
                # the diagonal from linear_moments holds V (m^2 + v) + V_b + M^2 v; put it in place
                cov.diagonal(dim1=-2, dim2=-1).copy_(var)
        elif isinstance(layer, Flatten):
            mean = mean.flatten(start_dim=1)
            var = None if var is None else var.flatten(start_dim=1)
        elif layer.fn == "relu":
            mean, var = relu_moments(mean, torch.zeros_like(mean) if var is None else var)
    if full_covariance:
        if cov is None:  # one dense layer on known inputs: the outputs are independent
            cov = torch.diag_embed(var)
        return mean, var, cov
    return mean, var


def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[softmax(z)]`` for ``z ~ N(mean, diag(var))`` by the probit approximation
    ``softmax(mean / sqrt(1 + pi/8 var))`` (MacKay 1992; laplace-torch's ``"probit"``), along the
    last dimension."""
    return torch.softmax(mean / torch.sqrt(1.0 + PROBIT_LAMBDA * var), dim=-1)


def sampled_softmax(mean: torch.Tensor, cov: torch.Tensor, num_points: int, seed: int | None = None,
                    max_elements: int = 2**22) -> torch.Tensor:
    """``E[softmax(z)]`` for ``z ~ N(mean, cov)`` (``mean`` ``(N, K)``, ``cov`` ``(N, K, K)``) by
    randomised quasi-Monte Carlo: the average of ``softmax(mean +- L e_j)`` over ``num_points``
    points ``e_j`` of a scrambled Sobol sequence in ``K`` dimensions mapped to ``N(0, I)`` by the
    inverse normal CDF, each taken with its antithetic twin (``2 num_points`` softmax evaluations;
    ``L`` the Cholesky factor of ``cov`` plus ``1e-6`` times its largest variance, so that a singular
    covariance, e.g. of a point mass, factors). The same points serve every example; ``seed`` fixes
    the scrambling (``None``: drawn from torch's global generator).

    Only ``K`` numbers per point and example, against a whole weight draw and forward pass for Monte
    Carlo over the weights; and for this smooth integrand the quasi-random points reach the
    accuracy of far more random draws (on 200 points of the tests' networks, 128 points are within
    0.002 of a 16,384-point estimate where 1,000 random draws are off by up to 0.01 to 0.03). Rows
    are processed in blocks of at most
    ``max_elements`` points times classes (bounded memory).
    """
    if num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points}")
    n, k = mean.shape
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    uniform = torch.quasirandom.SobolEngine(k, scramble=True, seed=seed).draw(num_points, dtype=torch.float64)
    points = torch.special.ndtri(uniform.clamp(1e-10, 1 - 1e-10)).to(device=mean.device, dtype=mean.dtype)
    jitter = 1e-6 * cov.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)
    eye = torch.eye(k, device=mean.device, dtype=mean.dtype)
    chol = torch.linalg.cholesky_ex(cov + jitter[:, None, None] * eye)[0]
    out = torch.empty_like(mean)
    rows = max(1, max_elements // (num_points * k))
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        shift = torch.einsum("nkl,sl->snk", chol[block], points)
        centre = mean[block]
        out[block] = (torch.softmax(centre + shift, -1).sum(0)
                      + torch.softmax(centre - shift, -1).sum(0)) / (2 * num_points)
    return out
