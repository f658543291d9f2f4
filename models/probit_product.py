"""The probit-product likelihood for classification (EM-TDAMP; Lucibello et al. 2022, DeepMP):

    p(y = k | z) = prod_{j != k} Phi((z_k - z_j) / sqrt(v))

the probability that ``z_k`` beats every other output under independent comparisons of noise
variance ``v``. It is the likelihood message passing works with: its log is a sum of log-concave
terms and its expectation under Gaussian outputs is a one-dimensional integral (see
:meth:`ProbitProductLikelihood.log_evidence`). The product sums to one over ``k`` only for two
classes; :attr:`ProbitProduct.probs` (used to sample and to predict) is the normalised version.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch.special import log_ndtr

from .likelihoods import Likelihood

_VAR_FLOOR = 1e-12
_TAIL = -10.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _tail_mask(x: torch.Tensor) -> torch.Tensor:
    """``1.0`` where ``x < -10`` (the Gaussian tail), else ``0.0``: a float mask, as boolean
    tensors are far slower than arithmetic on some CPU builds."""
    return torch.sign(_TAIL - x).clamp_min_(0.0)


def _log_cdf_and_mills(x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log Phi(x)`` and ``phi(x) / Phi(x)`` sharing their terms: directly above -10 (one ``erfc``),
    by their asymptotic series below, ``log Phi = -x^2/2 - log(-x) - log(2 pi)/2 + log(1 - 1/x^2 +
    3/x^4 - 15/x^6)`` and ``phi/Phi = -x - 1/x + 2/x^3 - ...`` (relative errors under 1e-6 there).
    Each branch sees clamped arguments (finite everywhere) and ``tail`` (float, 1 below -10)
    selects one exactly."""
    head = 1.0 - tail
    a = x.clamp(min=_TAIL)
    cdf = torch.erfc(a * -(0.5**0.5)).mul_(0.5)
    mills = torch.exp(-0.5 * a * a - _HALF_LOG_2PI).div_(cdf)
    log_cdf = cdf.log_()
    t = x.clamp(max=_TAIL)
    inv = t.reciprocal()
    inv2 = inv * inv
    series = -0.5 * t * t - torch.log(-t) - _HALF_LOG_2PI + torch.log1p(inv2 * (-1.0 + inv2 * (3.0 - 15.0 * inv2)))
    log_cdf.mul_(head).addcmul_(series, tail)
    mills_tail = -inv * (1.0 + inv2 * (-2.0 + inv2 * (10.0 + inv2 * (-74.0 + 706.0 * inv2)))) - t
    mills.mul_(head).addcmul_(mills_tail, tail)
    return log_cdf, mills


def log_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """``log Phi(x)`` from fast vectorised operations: ``log(erfc(-x / sqrt 2) / 2)`` above -10 and
    the asymptotic series ``-x^2/2 - log(-x) - log(2 pi)/2 + log(1 - 1/x^2 + 3/x^4 - 15/x^6)`` below
    (relative error under 1e-7 there); finite for every finite ``x``."""
    return _log_cdf_and_mills(x, _tail_mask(x))[0]


def pairwise_log_probit(f: torch.Tensor, noise_var: torch.Tensor | float) -> torch.Tensor:
    """``sum_{j != k} log Phi((f_k - f_j) / sqrt(v))`` for every class ``k``: shape ``f.shape``."""
    sd = math.sqrt(noise_var) if isinstance(noise_var, float) else noise_var.sqrt()
    d = (f.unsqueeze(-1) - f.unsqueeze(-2)) / sd  # [..., k, j] = (f_k - f_j) / sd
    return log_ndtr(d).sum(-1) - math.log(0.5)  # drop the j = k term, log Phi(0)


class ProbitProduct(TorchDistribution):
    """A class label with ``log_prob(k) = sum_{j != k} log Phi((f_k - f_j) / sqrt(noise_var))``.

    ``f`` has shape ``batch + (K,)``. ``log_prob`` is the (unnormalised for ``K > 2``) probit
    product of the model; ``probs`` normalises it over the classes and is what ``sample`` draws from.
    """

    arg_constraints = {"f": constraints.real_vector}
    has_enumerate_support = False

    def __init__(self, f: torch.Tensor, noise_var: torch.Tensor | float, validate_args=None):
        if f.dim() < 1 or f.shape[-1] < 2:
            raise ValueError(f"f must have a last dimension of at least two classes, got shape {tuple(f.shape)}")
        self.f = f
        self.noise_var = noise_var
        super().__init__(f.shape[:-1], torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.f.shape[-1] - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(self.f.expand(batch_shape + self.f.shape[-1:]), self.noise_var)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.long()
        value, f = torch.broadcast_tensors(value.unsqueeze(-1), self.f)
        f_k = f.gather(-1, value[..., :1])
        sd = math.sqrt(self.noise_var) if isinstance(self.noise_var, float) else self.noise_var.sqrt()
        return log_ndtr((f_k - f) / sd).sum(-1) - math.log(0.5)

    @property
    def class_log_products(self) -> torch.Tensor:
        """``log p(y = k | f)`` of the unnormalised product, for every class ``k``."""
        return pairwise_log_probit(self.f, self.noise_var)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.class_log_products, -1)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return torch.distributions.Categorical(probs=self.probs).sample(sample_shape)


def _inverse_mills(d: torch.Tensor) -> torch.Tensor:
    """``phi(d) / Phi(d)``: directly above -10, by its asymptotic series ``-d - 1/d + 2/d^3 - ...``
    below (where ``Phi`` loses precision)."""
    return _log_cdf_and_mills(d, _tail_mask(d))[1]


class _ProbitLogEvidence(torch.autograd.Function):
    """``log Z = logsumexp_q [log w_q + sum_{j != y} log Phi(d_qj)]`` with ``d_qj = (m_y + sqrt(2 tau_y)
    x_q - m_j) / s_j``, ``s_j = sqrt(v + tau_j)`` (Gauss-Hermite nodes ``x_q``, log-weights ``log w_q``).

    Backward in closed form: with ``p_q`` the softmax over nodes and ``A_qj = p_q phi(d_qj) /
    (Phi(d_qj) s_j)`` (zero for ``j = y``), ``d/dm_j = -sum_q A_qj``, ``d/dm_y = sum_qj A_qj``,
    ``d/dtau_y = sum_qj A_qj x_q / sqrt(2 tau_y)``, ``d/dtau_j = -sum_q A_qj d_qj / (2 s_j)``.
    """

    @staticmethod
    def forward(ctx, mean, var, y, noise_var, nodes, log_weights):
        out, saved = _probit_forward(mean, var, y, noise_var, nodes, log_weights)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        d_mean, d_var = _probit_backward(ctx.saved_tensors)
        g = grad.unsqueeze(-1)
        return g * d_mean, g * d_var, None, None, None, None


def _probit_forward(mean, var, y, noise_var, nodes, log_weights):
    """The log evidence of :class:`_ProbitLogEvidence` and what its derivatives need."""
    kept = 1.0 - torch.sign(_VAR_FLOOR - var).clamp_min_(0.0)  # 0 where the variance is floored
    var = var.clamp_min(_VAR_FLOOR)
    y = y.unsqueeze(-1)
    m_y, v_y = mean.gather(-1, y), var.gather(-1, y)  # (B, 1)
    scale_y = torch.sqrt(2.0 * v_y)
    z = torch.addcmul(m_y, scale_y, nodes)  # (B, Q)
    sd = torch.sqrt(noise_var + var)  # (B, K)
    d = (z.unsqueeze(-1) - mean.unsqueeze(-2)).div_(sd.unsqueeze(-2))  # (B, Q, K)
    other = torch.ones_like(mean).scatter_(-1, y, 0.0).unsqueeze(-2)  # 0 at j = y
    log_cdf, mills = _log_cdf_and_mills(d, _tail_mask(d))
    terms = log_cdf.mul_(other).sum(-1).add_(log_weights)
    out = torch.logsumexp(terms, -1)
    p = terms.sub_(out.unsqueeze(-1)).exp_()  # the softmax over nodes
    return out, (d, mills.mul_(other), p, sd, scale_y, y, kept, nodes)


def _probit_backward(saved):
    """``d log Z / d mean`` and ``d log Z / d var`` per example (closed forms of :class:`_ProbitLogEvidence`)."""
    d, mills, p, sd, scale_y, y, kept, nodes = saved
    a = (p.unsqueeze(-1) * mills).div_(sd.unsqueeze(-2))  # (B, Q, K), zero at j = y
    a_j = a.sum(-2)  # (B, K)
    total = a_j.sum(-1, keepdim=True)  # (B, 1)
    d_mean = (-a_j).scatter_add_(-1, y, total)
    d_var = (a * d).sum(-2).div_(sd).mul_(-0.5)
    d_var_y = (a.sum(-1) * nodes).sum(-1, keepdim=True).div_(scale_y)
    d_var = d_var.scatter_add_(-1, y, d_var_y).mul_(kept)
    return d_mean, d_var


class ProbitProductLikelihood(Likelihood):
    """``y ~ ProbitProduct(f, noise_var)``; ``noise_var`` lives in a buffer (EM may set it)."""

    task = "classification"

    def __init__(self, noise_var: float = 1.0, quadrature_points: int = 16):
        super().__init__()
        if isinstance(noise_var, bool) or not isinstance(noise_var, numbers.Real) or not 0 < noise_var < math.inf:
            raise ValueError(f"noise_var must be a positive finite number, got {noise_var!r}")
        if int(quadrature_points) < 2:
            raise ValueError(f"quadrature_points must be at least 2, got {quadrature_points!r}")
        self.register_buffer("noise_var", torch.tensor(float(noise_var)))
        nodes, weights = np.polynomial.hermite.hermgauss(int(quadrature_points))
        self.register_buffer("_nodes", torch.tensor(nodes, dtype=torch.float32), persistent=False)
        self.register_buffer("_log_weights", torch.tensor(np.log(weights) - 0.5 * np.log(np.pi), dtype=torch.float32),
                             persistent=False)

    def distribution(self, f: torch.Tensor) -> ProbitProduct:
        return ProbitProduct(f, self.noise_var)

    def class_probs(self, f: torch.Tensor) -> torch.Tensor:
        """Predictive class probabilities for outputs ``f``: the product, normalised over classes."""
        return torch.softmax(pairwise_log_probit(f, self.noise_var), -1)

    def log_evidence(self, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log E[p(y_n | z_n)]`` for independent Gaussian outputs ``z_n ~ N(mean_n, diag(var_n))``.

        Given ``z_y`` the comparisons are independent, ``E[Phi((z_y - z_j)/sqrt(v)) | z_y] =
        Phi((z_y - mean_j) / sqrt(v + var_j))``, leaving one integral over ``z_y``, done by
        Gauss-Hermite quadrature in log space. Differentiable in ``mean`` and ``var`` (closed-form
        derivatives, see :class:`_ProbitLogEvidence`).
        """
        return _ProbitLogEvidence.apply(mean, var, y.long(), self.noise_var.to(mean.dtype),
                                        self._nodes.to(mean.dtype), self._log_weights.to(mean.dtype))

    def log_evidence_and_grads(self, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor):
        """:meth:`log_evidence` and its derivatives with respect to ``mean`` and ``var`` (closed
        forms, no autograd): ``(log_z, d log_z / d mean, d log_z / d var)``."""
        out, saved = _probit_forward(mean, var, y.long(), self.noise_var.to(mean.dtype), self._nodes.to(mean.dtype),
                                     self._log_weights.to(mean.dtype))
        return (out, *_probit_backward(saved))

    def extra_repr(self) -> str:
        return f"noise_var={float(self.noise_var):g}"
