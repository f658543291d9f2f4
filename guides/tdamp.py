"""The TDAMP guide: the E-step of EM-TDAMP (Xu, Liu, Zhang & Lau 2024, *Bayesian Deep Learning via
Expectation Maximization and Turbo Deep Approximate Message Passing*) as a Pyro guide, in the form
implemented here: Module A is ADF/PBP-style moment propagation by default (``module_a="adf"``), or
deep AMP with Onsager-corrected cavity means and a damped turbo loop (``module_a="amp"``,
:mod:`~bnnzoo.guides.deep_amp`); one turbo iteration per minibatch by default.

The posterior over the weights of a dense ReLU network under the group-sparse Bernoulli-Gaussian
prior (:class:`~bnnzoo.models.BernoulliGaussianPrior`) is found by message passing, not gradients:

* **State**: for every weight, the Gaussian likelihood message of the data seen so far, in natural
  parameters (precision x mean ``eta``, precision ``lam``), held per layer as a ``(K, I + 1)``
  tensor whose last column is the bias (``messages.<layer>.eta`` / ``.precision``): a neuron's
  group is one row.
* **Module B** (:mod:`~bnnzoo.guides.group_sparse_messages`): exact sum-product on each group's
  spike-and-slab prior with these messages: inclusion probability ``pi_g`` of every neuron, the
  extrinsic (leave-one-out) Bernoulli-Gaussian prior of every weight and its posterior moments.
* **Module A** (:mod:`~bnnzoo.guides.moment_propagation`): with every weight's belief the
  moment-matched Bernoulli-Gaussian posterior ``N(M, V)`` (Module B's extrinsic prior times Module
  A's own message), a forward pass propagates activation means and variances and a backward pass
  returns the minibatch's Gaussian message to every weight: the batch form of probabilistic
  backpropagation's assumed-density update, not an AMP iteration (no Onsager correction).
* **Turbo iterations**: Module A and Module B exchange messages ``turbo_iterations`` times per
  minibatch, or, with ``turbo_tolerance``, until no inclusion probability nor slab mean (in slab
  posterior standard deviations) changes by more than it (one host read per iteration), at most
  ``turbo_iterations`` times; :meth:`TDAMPGuide.mean_turbo_iterations` counts them over a pass. With
  ``module_a="adf"`` every iteration folds its message into the state (the batch then counts once
  per iteration); with ``"amp"`` every iteration replaces the batch's message of the last
  (:func:`~bnnzoo.guides.deep_amp.turbo_update`).
* **Minibatches, posterior as prior**: after a batch of ``B`` of the ``N`` examples, the state
  becomes ``(1 - beta B / (N T)) state + beta (P / T) message``: the posterior after a batch is the
  prior of the next. The forgetting factor ``1 - beta B / (N T)`` keeps ``T = memory`` passes of
  messages in the state, and the factor ``P / T`` makes them worth ``P = temper`` copies of the data
  in all (``P = T = 1`` counts every example once; ``P > 1`` tempers the posterior as repeated
  assumed-density-filtering passes do; without ``temper``, ``P = T`` for a given memory and ``P = 10``
  with the memory rule, :meth:`TDAMPGuide.power`); ``beta`` (``damping``) smooths the updates. Each neuron's step
  is controlled by an exact line search on the batch's quadratic model (:meth:`TDAMPGuide._absorb`).
* **Step size and memory**: near the fixed point a batch moves the slab means by ``beta B / (N T)`` of
  the diagonal Newton step of the whole data set, so a pass moves them by ``beta / T`` of one, whatever
  ``N``: the memory ``T`` alone sets how fast the means move, the power ``P`` how concentrated the
  posterior is. ``memory=None`` takes the rule :func:`memory_rule`, ``T = clip(100 B / N, 1, 10)``
  passes: the state averages the messages of at least ``UPDATES_REMEMBERED = 100`` minibatches (a
  stochastic-approximation window; fewer makes the means noisy on small data) and never less than one
  pass (every example counts), so on large data the means move ``beta`` of a Newton step per pass
  rather than ``beta / 10``.

Data parallel: inside :func:`~bnnzoo.guides.data_parallel.data_parallel`, :meth:`TDAMPGuide.update` is
given the global minibatch on every rank, runs Module A on the rank's part of it and sums the parts of
the message (and of the pass statistics) over the ranks in one collective per turbo iteration before
the state absorbs it (:meth:`TDAMPGuide._update_parallel`): every rank keeps the state of the
1-process pass, up to the summation order. ``module_a="amp"`` is refused there.

Called as a Pyro guide, ``guide(x, y, num_data)`` samples every weight site of the model from the
Bernoulli-Gaussian posterior (each neuron on or off with probability ``pi_g``, then its weights from
the slab posterior), so ``pyro.infer.Predictive`` works unchanged. The state is plain tensors:
:meth:`TDAMPGuide.state` returns them and :meth:`TDAMPGuide.set_state` sets them (a federated
server aggregates them); :meth:`TDAMPGuide.set_posterior` sets the state from posterior moments.

Initialisation: symmetry between neurons is broken by a pseudo-message centred on a draw from the
slab (``N(0, sigma^2)``) with precision ``init_precision / sigma^2``, so the slab posterior starts at
that draw with variance ``sigma^2 / (1 + init_precision)``; the forgetting factor wipes it out.
"""

from __future__ import annotations

import math
import numbers
import warnings

import pyro
import torch
from torch import nn

from ..models.bernoulli_gaussian import (
    BernoulliGaussianPrior,
    GroupBernoulliGaussian,
    bias_given_weight,
)
from ..models.errors import ConfigError
from ..models.likelihoods import GaussianLikelihood
from ..models.probit_product import ProbitProductLikelihood
from .bmr import GaussianSite, Reduction
from .data_parallel import DataParallel, all_reduce_flat, broadcast_, current
from .deep_amp import belief_change, check_module_a, copy_posteriors, turbo_update
from .group_sparse_messages import (
    GroupPosterior,
    group_posterior,
    log_likelihood_ratio,
    make_workspace,
)
from .moment_propagation import (
    LayerRecord,
    WeightMessage,
    check_finite,
    check_network,
    gaussian_log_evidence,
    gaussian_log_evidence_and_grads,
    linear_moments,
    message_pass,
    propagate,
    weight_messages,
)
from .sites import split_site
from .weight_guide import WeightGuide

LINE_SEARCH_EXAMPLES = 32  # examples of a batch behind each neuron's step control
TRUST_RADIUS = 1.0  # a batch moves a pre-activation mean by at most this many predictive standard deviations
UPDATES_REMEMBERED = 100  # minibatch messages the state averages at least (memory=None, :func:`memory_rule`)
MAX_MEMORY = 10.0  # the rule's longest memory, in passes
DEFAULT_TEMPER = 10.0  # the likelihood's power with the memory rule and no temper (:meth:`TDAMPGuide.power`)


def memory_rule(num_data: int, batch_size: int) -> float:
    """The state's memory in passes when none is given: ``clip(UPDATES_REMEMBERED B / N, 1, MAX_MEMORY)``.

    A pass moves the slab means by ``damping / memory`` of a diagonal Newton step (module docstring),
    so a short memory fits faster; but the state is a running average of minibatch messages over
    ``memory N / B`` batches, and averaging fewer than ``UPDATES_REMEMBERED`` makes the means follow the
    noise of single batches. The memory is never below one pass (every example stays in the state)
    nor above ``MAX_MEMORY`` (the longest that was needed on small data)."""
    if num_data < 1 or batch_size < 1:
        raise ValueError(f"num_data and batch_size must be positive, got {num_data!r} and {batch_size!r}")
    return float(min(MAX_MEMORY, max(1.0, UPDATES_REMEMBERED * batch_size / num_data)))


def _check_positive(name: str, value, upper: float = math.inf, closed: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value
    ok = ok and (value <= upper if closed else value < upper)
    if not ok:
        if upper == math.inf:
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
        raise ValueError(f"{name} must lie in (0, {upper:g}{']' if closed else ')'}, got {value!r}")
    return float(value)


def _split(layer_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias parts (views) of a layer tensor whose last column is the bias."""
    return layer_tensor[:, :-1], layer_tensor[:, -1]


class TDAMPGuide(WeightGuide):
    """Bernoulli-Gaussian posterior over a dense ReLU network, fitted by TDAMP (module docstring).

    ``model`` is a :class:`~bnnzoo.models.BayesianNeuralNetwork` with a
    :class:`~bnnzoo.models.BernoulliGaussianPrior` and a
    :class:`~bnnzoo.models.GaussianLikelihood` (regression, noise variance ``v = noise_scale^2``)
    or :class:`~bnnzoo.models.ProbitProductLikelihood` (classification). ``init_locs`` (site ->
    tensor) replaces the random initial slab means. ``module_a`` is ``"adf"`` (moment propagation)
    or ``"amp"`` (deep AMP, :mod:`~bnnzoo.guides.deep_amp`); ``turbo_tolerance`` (``None``: off) stops
    a minibatch's turbo loop once the beliefs settle, ``turbo_iterations`` being then the cap.

    Implements :class:`~bnnzoo.guides.bmr.GaussianWeights` through its slab posteriors (see
    :meth:`gaussian_weights`), so Bayesian model reduction decides within the included neurons.
    """

    def __init__(self, model, damping: float = 0.8, turbo_iterations: int = 1, init_precision: float = 1.0,
                 memory: float | None = 1.0, init_locs: dict | None = None, temper: float | None = None,
                 module_a: str = "adf", turbo_tolerance: float | None = None):
        super().__init__(model)
        check_network(self.net)
        if not isinstance(model.prior, BernoulliGaussianPrior):
            raise TypeError(f"TDAMPGuide needs a BernoulliGaussianPrior, got {type(model.prior).__name__}")
        if not isinstance(model.likelihood, (GaussianLikelihood, ProbitProductLikelihood)):
            raise TypeError("TDAMPGuide needs a GaussianLikelihood (regression) or a ProbitProductLikelihood "
                            f"(classification), got {type(model.likelihood).__name__}")
        self.damping = _check_positive("damping", damping, 1.0, closed=True)
        if isinstance(turbo_iterations, bool) or not isinstance(turbo_iterations, numbers.Integral) \
                or turbo_iterations < 1:
            raise ValueError(f"turbo_iterations must be a positive integer, got {turbo_iterations!r}")
        self.turbo_iterations = int(turbo_iterations)
        #: Module A: ``"adf"`` (moment propagation) or ``"amp"`` (deep AMP, :mod:`~bnnzoo.guides.deep_amp`)
        self.module_a = check_module_a(module_a)
        #: the turbo loop stops when no inclusion probability nor slab mean (in slab posterior standard
        #: deviations) changes by more than this (``None``: always ``turbo_iterations`` exchanges)
        self.turbo_tolerance = None if turbo_tolerance is None else _check_positive("turbo_tolerance", turbo_tolerance)
        self.turbo_count = 0  # turbo iterations and minibatches of the current pass
        self.turbo_batches = 0
        #: keep every minibatch's output moments of the pass (the probit noise M-step reads them)
        self.collect_outputs = False
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.init_precision = _check_positive("init_precision", init_precision)
        if memory is not None:  # below one pass, examples are forgotten before the pass ends
            memory = _check_positive("memory", memory)
        #: passes the state remembers (``None``: :func:`memory_rule` of the data size and batch size)
        self.memory = memory
        #: the power of the likelihood the state holds (``None``: see :meth:`power`)
        self.temper = None if temper is None else _check_positive("temper", temper)
        self._batch_size = 0  # the largest batch seen (the rule's batch size)
        self.model = [model]  # a plain list: the guide reads the model's prior and likelihood, it does not own them
        self.messages = nn.ModuleDict()
        for layer in self.net.param_layers:
            s2 = model.prior.slab_var(layer.name)
            k, i = layer.weight_shape
            if init_locs is None:
                w0 = torch.randn(k, i + 1, device=s2.device) * s2.sqrt().unsqueeze(1)
            else:
                w0 = torch.cat([init_locs[f"{layer.name}.weight"], init_locs[f"{layer.name}.bias"].unsqueeze(1)], 1)
            lam = (self.init_precision / s2).unsqueeze(1).expand(k, i + 1).clone()
            mod = nn.Module()
            mod.register_buffer("eta", w0 * ((1.0 + self.init_precision) / s2).unsqueeze(1))  # slab mean = w0
            mod.register_buffer("precision", lam)
            self.messages[layer.name] = mod
        # statistics of the current pass (sums over examples): sum of (y - E z)^2 + Var z, log evidence
        self.register_buffer("noise_sum", torch.zeros(()))
        self.register_buffer("log_evidence_sum", torch.zeros(()))
        self.register_buffer("num_seen", torch.zeros(()))
        self._workspace: dict[str, dict[str, torch.Tensor]] = {}  # Module B's buffers in the training loop

    # ---- model parts ----------------------------------------------------------------------------
    @property
    def prior(self) -> BernoulliGaussianPrior:
        return self.model[0].prior

    @property
    def likelihood(self):
        return self.model[0].likelihood

    @property
    def task(self) -> str:
        return self.likelihood.task

    def noise_var(self) -> torch.Tensor:
        """The likelihood's noise variance ``v`` (a tensor on the device)."""
        lik = self.likelihood
        return lik.noise_var if isinstance(lik, ProbitProductLikelihood) else torch.exp(2 * lik.log_noise_scale.detach())

    def message(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The data's message to a weight site in natural parameters ``(eta, precision)`` (views)."""
        layer, _, param = site.rpartition(".")
        mod = self.messages[layer]
        pick = 0 if param == "weight" else 1
        return _split(mod.eta)[pick], _split(mod.precision)[pick]

    # ---- Module B -------------------------------------------------------------------------------
    def layer_posteriors(self, reuse_workspace: bool = False) -> dict[str, GroupPosterior]:
        """Module B per layer on the ``(K, I + 1)`` tensors (weights and bias of a neuron together,
        the bias last): each neuron's inclusion log-odds and its weights' slab posterior and
        Bernoulli-Gaussian posterior moments. ``reuse_workspace`` computes into buffers kept between
        calls (the training loop's; the results are overwritten by the next such call)."""
        out = {}
        for layer in self.net.param_layers:
            mod = self.messages[layer.name]
            workspace = None
            if reuse_workspace:
                workspace = self._workspace.get(layer.name)
                if workspace is None or workspace["mean"].device != mod.eta.device \
                        or workspace["mean"].dtype != mod.eta.dtype:
                    workspace = self._workspace[layer.name] = make_workspace(mod.eta)
            out[layer.name] = group_posterior(self.prior.logit_rho(layer.name), self.prior.slab_var(layer.name),
                                              mod.eta, mod.precision, keep=self.mask(f"{layer.name}.bias"),
                                              workspace=workspace)
        return out

    def group_posteriors(self) -> dict[str, GroupPosterior]:
        """Module B on every layer: each neuron's inclusion log-odds, and the slab posterior and
        Bernoulli-Gaussian posterior moments of its weights and of its bias."""
        out = {}
        for name, p in self.layer_posteriors().items():
            (w_sm, b_sm), (w_sv, b_sv) = _split(p.weight_slab[0]), _split(p.weight_slab[1])
            (w_m, b_m), (w_v, b_v) = _split(p.weight_moments[0]), _split(p.weight_moments[1])
            out[name] = GroupPosterior(p.log_odds, (w_sm, w_sv), (b_sm, b_sv), (w_m, w_v), (b_m, b_v))
        return out

    def inclusion(self) -> dict[str, torch.Tensor]:
        """``P(s_g = 1 | data)`` of every neuron, per hidden layer."""
        posts = self.layer_posteriors()
        return {layer.name: posts[layer.name].inclusion for layer in self.net.hidden_layers()}

    # ---- Module A and the turbo exchange ----------------------------------------------------------
    def log_evidence(self, f_mean: torch.Tensor, f_var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log E[p(y_n | z_n)]`` per example for Gaussian outputs ``z_n ~ N(f_mean, diag f_var)``."""
        if isinstance(self.likelihood, ProbitProductLikelihood):
            return self.likelihood.log_evidence(f_mean, f_var, y)
        return gaussian_log_evidence(y, f_mean, f_var, self.noise_var())

    def log_evidence_and_grads(self, f_mean: torch.Tensor, f_var: torch.Tensor, y: torch.Tensor):
        """:meth:`log_evidence` and its derivatives with respect to ``f_mean`` and ``f_var``, in
        closed form: ``(log_z, d log_z / d f_mean, d log_z / d f_var)``."""
        if isinstance(self.likelihood, ProbitProductLikelihood):
            return self.likelihood.log_evidence_and_grads(f_mean, f_var, y)
        return gaussian_log_evidence_and_grads(y, f_mean, f_var, self.noise_var())

    def propagate(self, x: torch.Tensor, posts: dict[str, GroupPosterior] | None = None):
        """Forward moment propagation with the current beliefs: output mean, variance and records."""
        posts = self.layer_posteriors() if posts is None else posts
        return propagate(self.net, x, {name: p.weight_moments for name, p in posts.items()})

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, num_data: int, likelihood_scale: float = 1.0) -> torch.Tensor:
        """Process one minibatch: ``turbo_iterations`` exchanges between Module A and Module B (fewer
        when the beliefs move by less than ``turbo_tolerance``), each followed by the
        posterior-as-prior update of the state (:meth:`_absorb`); with ``module_a="amp"``, deep AMP's
        turbo loop (:func:`~bnnzoo.guides.deep_amp.turbo_update`). Returns the
        batch's summed log evidence under the beliefs it was given (before its own update).

        ``likelihood_scale`` ``s`` multiplies the batch's whole message (curvatures, gradient terms
        and the per-example curvatures of the step control) while the forgetting rate stays that of
        ``num_data`` examples: the state then holds the ``num_data`` examples' likelihood raised to
        the power ``s P`` (a federated client with ``n_k`` of ``n`` examples and ``s = n / n_k`` stands
        for the whole training set). Scaling the message by ``s`` is the same as taking
        ``beta s`` in place of ``beta`` in front of it (:meth:`_absorb`); ``s = 1`` is plain TDAMP.
        The memory ``T`` and power ``P = temper`` enter as the forgetting rate ``beta B / (N T)`` and the
        message weight ``beta s P / T`` (module docstring).

        Inside :func:`~bnnzoo.guides.data_parallel.data_parallel`, ``(x, y)`` is the global minibatch
        (the same on every rank) and the update is data-parallel (:meth:`_update_parallel`)."""
        if not 0 < len(x) <= num_data:
            raise ValueError(f"a batch of {len(x)} examples cannot come from {num_data} training examples")
        likelihood_scale = _check_positive("likelihood_scale", likelihood_scale)
        memory = self.memory_for(num_data, len(x))
        rate = self.damping * len(x) / (num_data * memory)
        if rate >= 1:
            raise ConfigError(f"a memory of {memory:g} passes is too short for batches of {len(x)} of {num_data} "
                              f"examples: each batch would forget the whole state (damping B / (N T) = {rate:.3g}); "
                              f"give a longer memory or smaller batches")
        power = self.power()
        beta = self.damping * likelihood_scale * power / memory  # the message's weight as it enters the state
        parallel = current()
        if parallel is not None:
            return self._update_parallel(x, y, rate, beta, parallel)
        if self.module_a == "amp":
            return turbo_update(self, x, y, rate, beta)
        first = None
        posts_before = None
        for it in range(self.turbo_iterations):
            posts = self.layer_posteriors(reuse_workspace=True)
            if posts_before is not None:  # the convergence criterion (only with a tolerance)
                if float(belief_change(posts_before, posts)) < self.turbo_tolerance:  # one host read
                    break
            log_z, f_mean, f_var, messages = message_pass(
                self.net, x, {name: p.weight_moments for name, p in posts.items()},
                lambda mean, var: self.log_evidence_and_grads(mean, var, y),
                curv_out={name: w["curv"] for name, w in self._workspace.items()})
            self.turbo_count += 1
            if first is None:
                first = log_z.sum()
                self.record_batch(first, y, f_mean, f_var, len(x))
            if self.turbo_tolerance is not None and it + 1 < self.turbo_iterations:
                posts_before = copy_posteriors(posts)
            for name, msg in messages.items():
                self._absorb(name, posts[name], msg, rate, beta)
        self.turbo_batches += 1
        return first

    def record_batch(self, log_z_sum: torch.Tensor, y: torch.Tensor, f_mean: torch.Tensor, f_var: torch.Tensor,
                     batch_size: int) -> None:
        """Add a minibatch's first exchange to the pass's statistics: its summed log evidence, its
        size and (regression) its residual sum behind the noise M-step."""
        self.log_evidence_sum += log_z_sum
        self.num_seen += batch_size
        if self.task == "regression":
            self.noise_sum += self._residual_sum(y, f_mean, f_var)
        if self.collect_outputs:
            self._outputs.append((f_mean.detach().clone(), f_var.detach().clone(), y.clone()))

    @staticmethod
    def _residual_sum(y: torch.Tensor, f_mean: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
        """``sum_n (y_n - E z_n)^2 + Var z_n`` (regression), the sum behind the noise M-step."""
        residual = y - f_mean.squeeze(-1)
        return torch.addcmul(f_var.squeeze(-1), residual, residual).sum()

    # ---- data parallel ----------------------------------------------------------------------------
    def _update_parallel(self, x: torch.Tensor, y: torch.Tensor, rate: float, beta: float,
                         parallel: DataParallel) -> torch.Tensor:
        """:meth:`update` of the global minibatch ``(x, y)`` as rank ``parallel.rank`` of a
        data-parallel fit (:mod:`~bnnzoo.guides.data_parallel`): every rank is given the same global
        batch and holds the same state, computes Module A on its contiguous part of the batch
        (:meth:`~bnnzoo.guides.data_parallel.DataParallel.bounds`), and one ``all_reduce`` per turbo
        iteration (:func:`~bnnzoo.guides.data_parallel.all_reduce_flat`, one flat buffer) sums

        * per layer, the message's curvature ``sum_n c_n`` (before its floor at zero, which is applied
          to the sum) and gradient ``sum_n g_n^T h_n`` (with the input-variance term): the
          precision and precision-weighted mean the state absorbs;
        * the rows of the batch's first ``LINE_SEARCH_EXAMPLES`` examples that :meth:`_absorb`'s step
          control reads (inputs, per-example curvatures, pre-activation variances), each rank writing
          the rows it holds into zeros at their places in the global batch, so that every rank gets
          the global rows exactly;
        * on the first iteration, the pass statistics: the batch's summed log evidence and (regression)
          residual sum, and with :attr:`collect_outputs` the output moments of every example (placed
          as the rows above).

        Every rank then folds the same global message into the same state: the ranks keep one state,
        equal to the 1-process update of the global batch up to the summation order. At the first
        minibatch of a pass the state is broadcast from rank 0 (every rank also seeds alike). A rank
        whose part is empty (a batch smaller than the number of ranks) adds zeros. Module A
        ``"amp"`` has no data-parallel form here: its turbo loop keeps the per-example messages of
        the last iteration (:func:`~bnnzoo.guides.deep_amp.turbo_update`) and is refused."""
        if self.module_a == "amp":
            raise ConfigError("module_a='amp' (deep AMP) has no data-parallel pass: fit it in one process, or use "
                              "module_a='adf' with --devices / torchrun")
        if self.turbo_batches == 0:  # the first minibatch of a pass: one state on every rank
            broadcast_([t for layer in self.net.param_layers for t in (self.messages[layer.name].eta,
                                                                     self.messages[layer.name].precision)], parallel)
        batch = len(x)
        start, stop = parallel.bounds(batch)
        rows = min(batch, LINE_SEARCH_EXAMPLES)
        held = max(0, min(stop, rows) - start)  # rows of the step control's examples this rank holds
        xs, ys = x[start:stop], y[start:stop]

        def placed(local: torch.Tensor, total: int) -> torch.Tensor:
            """``local``'s leading rows at this rank's places among ``total`` global rows, zeros elsewhere."""
            out = local.new_zeros((total, *local.shape[1:]))
            count = min(len(local), max(0, total - start))
            out[start:start + count] = local[:count]
            return out

        first = None
        posts_before = None
        for it in range(self.turbo_iterations):
            posts = self.layer_posteriors(reuse_workspace=True)
            if posts_before is not None:  # the same beliefs on every rank: the same decision
                if float(belief_change(posts_before, posts)) < self.turbo_tolerance:
                    break
            log_z, f_mean, f_var, messages = message_pass(
                self.net, xs, {name: p.weight_moments for name, p in posts.items()},
                lambda mean, var: self.log_evidence_and_grads(mean, var, ys),
                curv_out={name: w["curv"] for name, w in self._workspace.items()}, floor_curvature=False)
            self.turbo_count += 1
            names = list(messages)
            parts = []
            for name in names:
                msg = messages[name]
                parts += [msg.curv, msg.grad, placed(msg.inputs[:held], rows), placed(msg.example_curv[:held], rows),
                          placed(msg.pre_var[:held], rows)]
            statistics = first is None
            if statistics:
                parts.append(log_z.sum().reshape(1))
                if self.task == "regression":
                    parts.append(self._residual_sum(ys, f_mean, f_var).reshape(1))
                if self.collect_outputs:
                    parts += [placed(f_mean, batch), placed(f_var, batch)]
            summed = iter(all_reduce_flat(parts, parallel))
            reduced = {}
            for name in names:
                curv, grad, inputs, example_curv, pre_var = (next(summed) for _ in range(5))
                reduced[name] = (WeightMessage(curv.clamp_min_(0.0), example_curv, inputs, pre_var, None, None), grad)
            if statistics:
                first = next(summed).reshape(())
                self.log_evidence_sum += first
                self.num_seen += batch
                if self.task == "regression":
                    self.noise_sum += next(summed).reshape(())
                if self.collect_outputs:
                    self._outputs.append((next(summed).clone(), next(summed).clone(), y.clone()))
            if self.turbo_tolerance is not None and it + 1 < self.turbo_iterations:
                posts_before = copy_posteriors(posts)
            for name, (msg, grad) in reduced.items():
                self._absorb(name, posts[name], msg, rate, beta, grad=grad, batch_size=batch)
        self.turbo_batches += 1
        return first

    def pass_outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The output means, variances and targets every minibatch of the current pass met (before
        its own update), concatenated; ``None`` when none were collected (:attr:`collect_outputs`)."""
        if not self._outputs:
            return None
        return tuple(torch.cat(parts) for parts in zip(*self._outputs))

    def mean_turbo_iterations(self) -> float:
        """Turbo iterations per minibatch in the current pass (0 before the first minibatch)."""
        return self.turbo_count / self.turbo_batches if self.turbo_batches else 0.0

    def power(self) -> float:
        """The power ``P`` of the likelihood the state holds: :attr:`temper`, or without one the
        memory when it is given (``P = T``: the algorithm as it was before the two were separate) and
        ``DEFAULT_TEMPER`` with the memory rule (the power the former default memory of 10 passes gave)."""
        if self.temper is not None:
            return self.temper
        return DEFAULT_TEMPER if self.memory is None else self.memory

    def memory_for(self, num_data: int, batch_size: int) -> float:
        """The memory (passes) of an update with ``batch_size`` of ``num_data`` examples: :attr:`memory`,
        or without one :func:`memory_rule` of ``num_data`` and the largest batch seen so far (a pass's
        last, smaller batch does not change it)."""
        if self.memory is not None:
            return self.memory
        self._batch_size = max(self._batch_size, int(batch_size))
        return memory_rule(num_data, self._batch_size)

    def _absorb(self, name: str, post: GroupPosterior, msg: WeightMessage, rate: float,
                beta: float | None = None, *, grad: torch.Tensor | None = None,
                batch_size: int | None = None) -> None:
        """Fold the batch's message into layer ``name``'s state, with a per-neuron step control.

        The state becomes ``(1 - rate) state + beta message`` (``beta = damping``), which moves each
        slab mean by ``Delta = m_new - m_old`` (the diagonal-Newton step of Module A's message). That
        step treats the weights of a neuron as independent, while the batch couples them through
        shared inputs: the batch's curvature along ``Delta`` is ``sum_n G_n (h_n . Delta)^2``, not
        ``sum_i c_i Delta_i^2``. An exact line search on the batch's quadratic model along ``Delta``
        gives each neuron the step fraction

            t = D / (D - beta sum_i c_i Delta_i^2 + beta sum_n G_n (pi h_n . Delta)^2),   D = sum_i P_new,i Delta_i^2

        (clamped to ``[0, 1]``), and the slab mean moves by ``t Delta`` (precision unchanged). Without
        it, the summed messages of a batch of correlated examples overshoot and diverge. As the
        quadratic model holds only near the beliefs, ``t`` is also capped so that the neuron's
        pre-activation means move by at most ``TRUST_RADIUS`` predictive standard deviations (root
        mean square over the examples): layers are updated together, and a large move of one layer
        invalidates the model of the next. The coupled
        sum over examples is estimated on the first ``LINE_SEARCH_EXAMPLES`` examples of the (shuffled)
        batch, scaled to the batch: an unbiased estimate at a fraction of a matrix product's cost.

        Implementation: the message's gradient ``g^T h`` is folded into the state by one in-place
        matrix product (``eta <- (1 - rate) eta + beta g^T h``), and in the training loop every
        elementwise step writes into Module B's workspace, whose tensors are free once the state is
        updated (no allocation per batch).

        ``beta`` (default ``damping``) is the weight of the message; :meth:`update` passes
        ``damping * likelihood_scale * P / T`` (power over memory).

        ``grad`` (default: formed from ``msg``) is the message's whole gradient ``g^T h`` plus its
        input-variance term, already summed, and ``batch_size`` (default ``len(msg.inputs)``) the
        batch's size, when ``msg`` holds only the rows of the step control's examples (a
        data-parallel step, :meth:`_update_parallel`).
        """
        beta = self.damping if beta is None else beta
        mod = self.messages[name]
        eta, lam = mod.eta, mod.precision
        inv_s2 = self.prior.slab_var(name).reciprocal().unsqueeze(1)
        pi = post.inclusion
        m_old, w_mean = post.weight_slab[0], post.weight_moments[0]
        # the new state: precision (1 - rate) lam + beta c, precision-mean (1 - rate) eta + beta (g^T h + c M)
        lam.mul_(1.0 - rate).add_(msg.curv, alpha=beta)
        if grad is None:
            eta.addmm_(msg.pre_grad.t(), msg.inputs, beta=1.0 - rate, alpha=beta)
            if msg.var_grad_term is not None:
                eta.add_(msg.var_grad_term, alpha=beta)
        else:
            eta.mul_(1.0 - rate).add_(grad, alpha=beta)
        eta.addcmul_(msg.curv, w_mean, value=beta)
        workspace = self._workspace.get(name)
        if workspace is not None and workspace["mean"] is m_old:  # scratch space: Module B's tensors
            precision, neg_delta, sq, tmp = workspace["precision"], workspace["terms"], workspace["var"], \
                workspace["post_var"]
            ones = workspace["ones"]
        else:
            precision, neg_delta, sq, tmp = (torch.empty_like(eta) for _ in range(4))
            ones = eta.new_ones(eta.shape[1])
        torch.add(lam, inv_s2, out=precision)
        torch.addcdiv(m_old, eta, precision, value=-1.0, out=neg_delta)  # -Delta = m_old - eta / P
        torch.mul(neg_delta, neg_delta, out=sq)
        d_new = torch.mv(torch.mul(sq, precision, out=tmp), ones)  # sum_i P_new Delta^2, per neuron
        d_msg = torch.mv(sq.mul_(msg.curv), ones)  # sum_i c Delta^2
        # the coupled curvature, estimated on at most LINE_SEARCH_EXAMPLES examples of the batch
        n = min(len(msg.inputs), LINE_SEARCH_EXAMPLES)
        change_sq = (msg.inputs[:n] @ neg_delta.t()).mul_(pi).square_()  # (n, K): (pi (h_n . Delta + Delta_bias))^2
        batch_size = len(msg.inputs) if batch_size is None else batch_size
        coupled = (msg.example_curv[:n] * change_sq).sum(0).mul_(batch_size / n)
        denom = d_new - beta * d_msg + beta * coupled
        tiny = torch.finfo(denom.dtype).tiny
        t = torch.where(denom > 0, d_new / denom.clamp_min(tiny), torch.ones_like(denom))
        # trust region: the mean change of the neuron's pre-activation stays within TRUST_RADIUS of
        # its predictive standard deviations (root mean squares over the examples)
        limit = torch.sqrt(msg.pre_var[:n].sum(0) / change_sq.sum(0).clamp_min(tiny)).mul_(TRUST_RADIUS)
        shrink = 1.0 - torch.minimum(t, limit).clamp_(0.0, 1.0)  # the part of the step taken back
        # eta_final = P_new (m_old + t Delta) = eta_new - (1 - t) P_new Delta = eta_new + shrink P_new (-Delta)
        eta.addcmul_(torch.mul(precision, neg_delta, out=tmp), shrink.unsqueeze(1))

    def reset_statistics(self) -> None:
        """Start a new pass: zero the sums behind the noise M-step and the pass's log evidence."""
        self.noise_sum.zero_()
        self.log_evidence_sum.zero_()
        self.num_seen.zero_()
        self.turbo_count = 0
        self.turbo_batches = 0
        self._outputs = []

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if any message holds a NaN or infinity (never replaced)."""
        for layer in self.net.param_layers:
            mod = self.messages[layer.name]
            check_finite(f"the messages of {layer.name}", mod.eta, mod.precision)
        check_finite("the log evidence", self.log_evidence_sum)

    # ---- the Pyro guide and draws -----------------------------------------------------------------
    def _site_distributions(self, post: GroupPosterior):
        (w_m, b_m), (w_v, b_v) = _split(post.weight_slab[0]), _split(post.weight_slab[1])
        weight = GroupBernoulliGaussian(post.inclusion, w_m, w_v.sqrt())
        return weight, lambda w: bias_given_weight(w, b_m, b_v.sqrt(), 1)

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        """Sample every weight site from the Bernoulli-Gaussian posterior (a Pyro guide)."""
        with torch.no_grad():
            posts = self.layer_posteriors()
        out = {}
        for layer in self.net.param_layers:
            weight, bias = self._site_distributions(posts[layer.name])
            w = pyro.sample(f"{layer.name}.weight", weight)
            out[f"{layer.name}.weight"] = w
            out[f"{layer.name}.bias"] = pyro.sample(f"{layer.name}.bias", bias(w))
        return out

    @torch.no_grad()
    def sample_sites(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` joint posterior draws of every weight site, stacked on a leading axis
        (Module B run once, masks applied)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        out = {}
        for name, p in self.layer_posteriors().items():
            weight, bias = self._site_distributions(p)
            w = weight.sample((int(num_samples),))
            out[f"{name}.weight"], out[f"{name}.bias"] = w, bias(w).sample()
        return self.apply_masks(out)

    @torch.no_grad()
    def draws(self, num_samples: int, chunk_size: int = 256):
        """Yield ``num_samples`` joint posterior draws of every weight site (drawn ``chunk_size`` at a
        time by :meth:`sample_sites`)."""
        done = 0
        while done < num_samples:
            n = min(chunk_size, num_samples - done)
            chunk = self.sample_sites(n)
            for i in range(n):
                yield {site: value[i] for site, value in chunk.items()}
            done += n

    def draw(self) -> dict[str, torch.Tensor]:
        return next(self.draws(1))

    @torch.no_grad()
    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return self.apply_masks(self._sites(self.layer_posteriors(), "mean"))

    @torch.no_grad()
    def posterior_var(self) -> dict[str, torch.Tensor]:
        return self.apply_masks(self._sites(self.layer_posteriors(), "var"))

    @staticmethod
    def _sites(posts: dict[str, GroupPosterior], what: str) -> dict[str, torch.Tensor]:
        pick = {"mean": lambda p: p.weight_moments[0], "var": lambda p: p.weight_moments[1],
                "slab_mean": lambda p: p.weight_slab[0], "slab_var": lambda p: p.weight_slab[1]}[what]
        out = {}
        for name, p in posts.items():
            w, b = _split(pick(p))
            out[f"{name}.weight"], out[f"{name}.bias"] = w.contiguous(), b.contiguous()
        return out

    # ---- state as plain tensors (federated aggregation) -------------------------------------------
    @torch.no_grad()
    def state(self) -> dict[str, dict | torch.Tensor]:
        """Every quantity of the fitted posterior as plain tensors (copies, per weight site):

        ``message_eta`` / ``message_precision`` (site -> tensor): the data's Gaussian message to each
        weight; ``mean`` / ``var``: posterior moments; ``slab_mean`` / ``slab_var``: the slab
        posterior; ``inclusion`` (layer -> per-neuron ``P(s_g = 1)``); ``logit_rho`` / ``prior_var``
        (layer -> per-group prior, ``logit_rho = +inf`` for the output layer); ``noise_var``;
        ``noise_sum``, ``log_evidence_sum``, ``num_seen`` (the current pass's sums, behind the noise
        M-step).
        """
        posts = self.layer_posteriors()
        sites = list(self.net.sites())
        layers = [layer.name for layer in self.net.param_layers]
        return {
            "message_eta": {s: self.message(s)[0].clone() for s in sites},
            "message_precision": {s: self.message(s)[1].clone() for s in sites},
            **{what: self._sites(posts, what) for what in ("mean", "var", "slab_mean", "slab_var")},
            "inclusion": {n: posts[n].inclusion for n in layers},
            "logit_rho": {n: self.prior.logit_rho(n).clone() for n in layers},
            "prior_var": {n: self.prior.slab_var(n).clone() for n in layers},
            "noise_var": self.noise_var().clone(),
            "noise_sum": self.noise_sum.clone(),
            "log_evidence_sum": self.log_evidence_sum.clone(),
            "num_seen": self.num_seen.clone(),
        }

    @torch.no_grad()
    def set_state(self, state: dict) -> None:
        """Set the messages (``message_eta``, ``message_precision``), and, when given, the prior
        (``logit_rho`` of hidden layers, ``prior_var``), the noise variance and the pass statistics,
        from tensors shaped as :meth:`state` returns them. Derived entries (``mean``, ``inclusion``...)
        are ignored."""
        sites = self.net.sites()
        for key, pick in (("message_eta", 0), ("message_precision", 1)):
            for site, value in state.get(key, {}).items():
                if site not in sites:
                    raise KeyError(f"unknown site {site!r} in {key}; sites are {list(sites)}")
                if tuple(value.shape) != tuple(sites[site]):
                    raise ValueError(f"{key}[{site}] has shape {tuple(value.shape)}, expected {sites[site]}")
                if key == "message_precision" and bool((value < 0).any()):
                    raise ValueError(f"message_precision[{site}] must be non-negative")
                self.message(site)[pick].copy_(value)
        hidden = [layer.name for layer in self.net.hidden_layers()]
        for layer in self.net.param_layers:
            logit = state.get("logit_rho", {}).get(layer.name) if layer.name in hidden else None
            self.prior.set_group_parameters(layer.name, logit_rho=logit,
                                            slab_var=state.get("prior_var", {}).get(layer.name))
        if "noise_var" in state:
            self.set_noise_var(state["noise_var"])
        for key in ("noise_sum", "log_evidence_sum", "num_seen"):
            if key in state:
                getattr(self, key).copy_(state[key])

    @torch.no_grad()
    def set_posterior(self, slab_mean: dict, slab_var: dict, inclusion: dict | None = None) -> None:
        """Set the messages so that the slab posterior of every weight is ``N(slab_mean, slab_var)``
        (``slab_var`` must not exceed the prior's ``sigma^2``) and, when ``inclusion`` is given, set
        each hidden group's ``rho`` so that its posterior inclusion probability is ``inclusion`` (in
        ``(0, 1)``)."""
        for site in self.net.sites():
            layer = site.rpartition(".")[0]
            m, v = slab_mean[site], slab_var[site]
            s2 = self.prior.slab_var(layer).reshape((-1,) + (1,) * (m.dim() - 1))
            lam = 1.0 / v - 1.0 / s2
            if bool((lam < -1e-6 / s2).any()):
                raise ValueError(f"slab_var[{site}] exceeds the prior variance sigma^2: no Gaussian message gives it")
            eta_view, lam_view = self.message(site)
            lam_view.copy_(lam.clamp_min(0.0).expand_as(m))
            eta_view.copy_(m / v)
        if inclusion is not None:
            posts = self.layer_posteriors()
            for layer in self.net.hidden_layers():
                target = inclusion[layer.name]
                if not bool(((target > 0) & (target < 1)).all()):
                    raise ValueError(f"inclusion[{layer.name}] must lie strictly between 0 and 1")
                llr_sum = posts[layer.name].log_odds - self.prior.logit_rho(layer.name)
                self.prior.set_group_parameters(layer.name, logit_rho=torch.logit(target) - llr_sum)

    @torch.no_grad()
    def set_noise_var(self, value: torch.Tensor | float) -> None:
        """Set the likelihood's noise variance ``v`` (the EM M-step, or a federated server)."""
        value = torch.as_tensor(value, dtype=torch.float32, device=self._device())
        check_finite("the noise variance", value)
        if not bool(value > 0):
            raise ValueError("the noise variance must be positive")
        lik = self.likelihood
        if isinstance(lik, ProbitProductLikelihood):
            lik.noise_var.copy_(value)
        else:
            lik.log_noise_scale.copy_(0.5 * torch.log(value))

    # ---- Bayesian model reduction (the GaussianWeights protocol) -----------------------------------
    @torch.no_grad()
    def gaussian_weights(self, level: str = "weight") -> dict[str, GaussianSite]:
        """The Gaussian part of the posterior: given that its neuron is on, each weight's posterior
        is the slab posterior ``N(slab_mean, slab_var)`` under the slab prior ``N(0, sigma_l^2)``
        (per group). At ``level="weight"`` only the weights are offered: a neuron's bias is tied to
        its on/off state (a pruned bias would switch the whole neuron off), so a bias is reduced
        with its group (``level="group"``) only."""
        posts = self.layer_posteriors()
        slab_mean, slab_var = self._sites(posts, "slab_mean"), self._sites(posts, "slab_var")
        out = {}
        for site, mu in slab_mean.items():
            layer, param = split_site(site)
            if param == "bias" and level == "weight":
                continue
            prior_var = self.prior.slab_var(layer).clone().reshape((-1,) + (1,) * (mu.dim() - 1))
            out[site] = GaussianSite(mu, slab_var[site], prior_var)
        return out

    @torch.no_grad()
    def apply_reduction(self, reduction: Reduction) -> None:
        """Masks for the pruned weights (exact zeros in every draw; a neuron whose weights are all
        pruned loses its bias too, i.e. the neuron is removed); with a shrinking reduction
        (``reduced_var > 0``) the slab posteriors of the accepted weights are set to the reduced
        ones, each included neuron's inclusion probability kept as it was."""
        masks = dict(reduction.masks)
        for site in list(masks):
            layer, param = split_site(site)
            bias = f"{layer}.bias"
            if param == "weight" and bias not in masks:
                row_kept = masks[site].reshape(masks[site].shape[0], -1).any(1)
                before = self.mask(bias)
                masks[bias] = row_kept if before is None else row_kept & before
        if reduction.reduced_var > 0 and reduction.locs:
            state = self.state()
            slab_mean, slab_var = state["slab_mean"], state["slab_var"]
            for site, accept in reduction.accepted.items():
                slab_mean[site] = torch.where(accept, reduction.locs[site].to(slab_mean[site].dtype), slab_mean[site])
                slab_var[site] = torch.where(accept, reduction.variances[site].to(slab_var[site].dtype), slab_var[site])
            hidden = [layer.name for layer in self.net.hidden_layers()]
            before = {name: post.log_odds for name, post in self.group_posteriors().items() if name in hidden}
            self.set_posterior(slab_mean, slab_var)
            after = self.group_posteriors()
            for name in hidden:  # keep each included neuron's inclusion probability as it was
                shift = torch.where(torch.isfinite(before[name]), after[name].log_odds - before[name],
                                    torch.zeros_like(before[name]))
                self.prior.set_group_parameters(name, logit_rho=self.prior.logit_rho(name) - shift)
        self.set_masks(masks)

    def extra_repr(self) -> str:
        return (f"module_a={self.module_a!r}, damping={self.damping:g}, turbo_iterations={self.turbo_iterations}, "
                f"turbo_tolerance={self.turbo_tolerance}, "
                f"init_precision={self.init_precision:g}, memory={'rule' if self.memory is None else f'{self.memory:g}'}, "
                f"temper={self.power():g}")


# ---- one linear layer: Bernoulli-Gaussian turbo GAMP ----------------------------------------------
LINEAR_METHODS = ("gamp", "ep", "ep-clamped")  # Module A of :func:`linear_tdamp`
STALL_ITERATIONS = 20  # iterations without a new smallest change before :func:`linear_tdamp` halves its damping
MIN_DAMPING = 0.05  # the floor of that halving
STALL_STOP = 200  # iterations without a new smallest change at the floor after which the iteration stops
PD_BACKTRACKS = 30  # halvings of an EP step of Module B's messages that would leave the Gaussian part indefinite
EP_MATCH_TOL = 1e-3  # EP's fixed point: the Gaussian part's marginals match Module B's moments to this


@torch.no_grad()
def linear_tdamp(A: torch.Tensor, y: torch.Tensor, rho: float, slab_var: float, noise_var: float,
                 iterations: int = 500, damping: float = 0.5, tol: float = 1e-7, learn_rho: bool = False,
                 learn_noise: bool = False, method: str = "gamp") -> dict[str, torch.Tensor]:
    """TDAMP with a single linear layer: ``y = A x + N(0, v I)``, ``x_i ~ rho N(0, s^2) + (1 - rho) delta``.

    Every unknown is its own group. Module B (:func:`~bnnzoo.guides.group_sparse_messages.group_posterior`)
    turns the Gaussian message ``N(mu_i, 1/c_i)`` that Module A sends each ``x_i`` (natural parameters
    ``eta``, ``lam``) into the Bernoulli-Gaussian posterior moments ``M``, ``V`` and the inclusion
    probability. Module A is one of (``method``):

    * ``"gamp"`` (default): Bernoulli-Gaussian turbo GAMP (Rangan 2011). Module A
      (:func:`~bnnzoo.guides.moment_propagation.linear_moments`, the Gaussian log evidence and
      :func:`~bnnzoo.guides.moment_propagation.weight_messages`) evaluates the output at the
      Onsager-corrected mean ``p_n = (A M)_n - tau_n s_n`` (``tau_n = sum_i A_ni^2 V_i``, ``s_n`` the
      previous iteration's score ``d log Z_n / d p_n = (y_n - p_n) / (v + tau_n)``) and sends
      ``c_i = sum_n A_ni^2 / (v + tau_n)``, ``mu_i = M_i + (1/c_i) sum_n A_ni s_n``. The Onsager term
      removes each unknown's own contribution from the residual it sees; without it the fixed point
      is a ridge regression weighted by ``1 / (v + tau_n)`` rather than the GAMP fixed point (which,
      for a Gaussian prior, is the exact posterior mean). ``O(m n)`` per iteration.
    * ``"ep"``: expectation propagation (Minka 2001) with exact cavities (the turbo form of EP /
      vector AMP with one variance per unknown). Module B's extrinsic message to the likelihood is the Gaussian
      quotient ``N(M, V) / N(mu, 1/c)``: precision ``lam_B = 1/V - c``, precision-mean ``eta_B = M/V -
      c mu`` (negative precisions allowed). Module A multiplies the likelihood by these messages,
      ``Sigma = (A^T A / v + diag lam_B)^-1``, ``m = Sigma (A^T y / v + eta_B)``, and sends each ``x_i``
      the exact cavity: ``c_i = 1 / Sigma_ii - lam_B,i``, ``c_i mu_i = m_i / Sigma_ii - eta_B,i``. GAMP's
      ``c_i`` and Onsager term are the large-system limits of this cavity: they treat the columns of
      ``A`` as uncorrelated, which holds when ``m`` and ``n`` grow with ``A`` i.i.d., but with a few
      rows (``m = 8``) two columns correlate by ``O(1/sqrt(m))`` and GAMP's fixed point moves away from
      the posterior; EP keeps those correlations and is exact for a Gaussian prior at any size. Its
      remaining error is the product of one Gaussian message per unknown (two unknowns that
      explain the same data are competing supports that no such product represents). ``O(n^3)`` per
      iteration (one Cholesky factorisation and its inverse): for small layers. A step of Module
      B's messages that would make ``A^T A / v + diag lam_B`` indefinite is halved until it is not (at
      most ``PD_BACKTRACKS`` times, then the previous messages are kept); an unknown whose cavity
      precision is not positive keeps its previous message. Also returns EP's approximation of the
      log evidence ``log p(y)`` (``log_evidence``, below).
    * ``"ep-clamped"``: EP with each inclusion clamped in turn, as conditioned belief propagation
      clamps a variable (Eaton & Ghahramani 2009, *Choosing a variable to clamp*), for the unknowns'
      marginals beyond one Gaussian message each. By Bayes'
      rule ``logit P(x_i != 0 | y) = logit rho + log p(y | x_i on) - log p(y | x_i off)``: EP gives
      both evidences (``x_i`` on: its prior is the Gaussian slab, so its message is exact; off: its
      column is removed), and ``E[x_i | y] = P(x_i != 0 | y) E[x_i | y, x_i on]`` with the second
      factor EP's mean of the clamped problem. ``2 n + 1`` EP runs, the clamped ones started from
      plain EP's messages and damping. A clamped problem without an EP fixed point (typically the
      improbable branch, e.g. a certainly included unknown switched off) leaves that unknown with
      plain EP's marginal, and so does every unknown when plain EP has no fixed point (warned);
      ``clamped`` says which unknowns were clamped. No ``learn_rho`` / ``learn_noise``.

    EP's log evidence: the product of the likelihood and sites ``C_i exp(eta_B,i x_i - lam_B,i x_i^2 /
    2)``, each ``C_i`` such that the site and the prior have the same integral against the cavity
    ``N(mu_i, 1/c_i)`` (``Z_i = (1 - rho) N(0; mu_i, 1/c_i) + rho N(0; mu_i, 1/c_i + s^2)``):
    ``log p(y) ~ sum_i log C_i + log int N(y; A x, v I) prod_i exp(eta_B,i x_i - lam_B,i x_i^2 / 2) dx``,
    exact for a Gaussian prior.

    The data are one batch. Module A's messages are damped (``damping``, the weight of the new
    message) until Module B's posterior means change by less than ``tol`` (relative), at most
    ``iterations`` times; when the change has not reached a new minimum for ``STALL_ITERATIONS``
    iterations (the iteration oscillates or stalls) the damping is halved, down to ``MIN_DAMPING``;
    at that floor, ``STALL_STOP`` iterations without a new smallest change stop the iteration
    unconverged.
    EP's fixed point matches moments (the Gaussian part's marginals equal Module B's ``M``, ``V``):
    a run that stops without them matching to ``EP_MATCH_TOL`` (a step held back to keep the Gaussian
    part positive definite, an iteration run away) is not converged and warns (``RuntimeWarning``).
    One host read per iteration (the convergence test; EP also reads whether the factorisation
    succeeded). With ``learn_rho`` / ``learn_noise`` the EM M-step updates ``rho`` and ``v`` after each
    iteration.

    Returns ``mean``, ``var``, ``inclusion`` (each ``(n,)``), ``rho``, ``noise_var``, ``iterations``,
    ``converged`` (whether the change fell below ``tol`` before the cap, and for EP whether the
    moments match), ``damping`` (the final damping); with EP also ``log_evidence``; with
    ``"ep-clamped"`` also ``clamped`` (``(n,)``, bool), and ``iterations`` / ``converged`` /
    ``damping`` / ``log_evidence`` are plain EP's.
    """
    if A.dim() != 2 or y.shape != (A.shape[0],):
        raise ValueError(f"A must be (m, n) and y (m,), got {tuple(A.shape)} and {tuple(y.shape)}")
    if method not in LINEAR_METHODS:
        raise ConfigError(f"unknown method {method!r} for linear_tdamp; choose one of {LINEAR_METHODS}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ConfigError(f"iterations must be a positive integer, got {iterations!r}")
    damping = _check_positive("damping", damping, 1.0, closed=True)
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and 0 <= tol < math.inf):
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
    _check_positive("rho", rho, 1.0)
    _check_positive("noise_var", noise_var)
    _check_positive("slab_var", slab_var)
    if method == "ep-clamped" and (learn_rho or learn_noise):
        raise ConfigError("method='ep-clamped' learns neither rho nor the noise: use method='ep' with "
                          "learn_rho / learn_noise, then clamp with the learned values")
    run = _linear_turbo(A, y, rho, slab_var, noise_var, int(iterations), damping, float(tol), learn_rho,
                        learn_noise, "gamp" if method == "gamp" else "ep")
    if method != "ep-clamped":
        del run["messages"]
    if method != "gamp" and not run.pop("matched"):
        warnings.warn(f"linear_tdamp (ep) stopped after {int(run['iterations'])} iterations without a fixed point: "
                      f"the Gaussian part's marginals do not match Module B's moments to {EP_MATCH_TOL:g}; the "
                      "result is not EP's", RuntimeWarning, stacklevel=3)
    if method == "ep-clamped":
        run.update(_clamped_marginals(A, y, rho, slab_var, noise_var, int(iterations), damping, float(tol), run))
    return run


def _linear_turbo(A, y, rho, slab_var, noise_var, iterations, damping, tol, learn_rho, learn_noise, method,
                  clamped_on: int | None = None, start: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The iteration of :func:`linear_tdamp` (options checked there); ``clamped_on``: the unknown whose
    prior is the slab alone (EP only); ``start``: Module A's first messages ``(eta, lam)`` (``(n, 1)``;
    default flat). Adds ``matched`` (EP: the moments match) and ``messages`` (Module A's last
    ``(eta, lam)``) to the result."""
    rho_t = torch.tensor(rho, dtype=A.dtype, device=A.device)
    v = torch.tensor(noise_var, dtype=A.dtype, device=A.device)
    n = A.shape[1]
    s2 = torch.full((n,), slab_var, dtype=A.dtype, device=A.device)
    on = torch.zeros(n, dtype=torch.bool, device=A.device)
    if clamped_on is not None:
        on[clamped_on] = True
    eta = torch.zeros(n, 1, dtype=A.dtype, device=A.device)  # Module A's messages to Module B
    lam = torch.zeros_like(eta)
    if start is not None:
        eta, lam = start
    if method == "ep":
        gram, rhs = A.t() @ A, (A.t() @ y).unsqueeze(-1)  # divided by v where used (v may be learned)
        eta_b = lam_b = None  # Module B's messages to Module A
    else:
        zero = torch.zeros(1, dtype=A.dtype, device=A.device)
        score = torch.zeros(A.shape[0], 1, dtype=A.dtype, device=A.device)  # s_n of the previous iteration
    previous, best, since_best, converged = None, math.inf, 0, False
    for it in range(1, iterations + 1):
        logit = torch.where(on, math.inf, torch.logit(rho_t))
        post = group_posterior(logit, s2, eta, lam)
        mean, var = post.weight_moments  # (n, 1): one group per unknown
        if method == "ep":
            eta_b, lam_b, chol = _ep_module_b_messages(gram / v, mean, var, eta, lam, eta_b, lam_b)
            shift, b_mean, b_var = rhs / v, mean, var
            new_eta, new_lam = _ep_cavities(chol, shift, eta_b, lam_b)
            keep = new_lam > 0
            eta = torch.where(keep, (1 - damping) * eta + damping * new_eta, eta)
            lam = torch.where(keep, (1 - damping) * lam + damping * new_lam, lam)
            tau = (A * A) @ var if learn_noise else None  # the output variances, for the noise M-step
        else:
            with torch.enable_grad():
                p, tau, records = propagate_linear(A, mean.t(), var.t(), zero, score=score)
                log_z = gaussian_log_evidence(y, p, tau, v)
                msg = weight_messages(records, log_z, {"x": mean.t()})["x"]
            score = msg.pre_grad
            curv, grad = msg.curv.t(), msg.grad.t()
            eta = (1 - damping) * eta + damping * (curv * mean + grad)
            lam = (1 - damping) * lam + damping * curv
        if learn_rho:
            rho_t = post.inclusion.mean().clamp(1e-6, 1 - 1e-6)
        if learn_noise:
            v = (((y - (A @ mean).squeeze(-1)) ** 2 + tau.detach().squeeze(-1)).mean()).clamp_min(1e-10)
        current = mean.squeeze(-1)
        if previous is not None:
            change = float((current - previous).norm())  # one host read
            if change <= tol * max(float(current.norm()), 1e-30):
                converged = True
                break
            if change < best:
                best, since_best = change, 0
            else:
                since_best += 1
                if since_best >= STALL_ITERATIONS and damping > MIN_DAMPING:
                    damping, best, since_best = max(damping / 2, MIN_DAMPING), change, 0
                elif since_best >= STALL_STOP:  # at the floor and still no progress: no fixed point in reach
                    break
        previous = current
    logit = torch.where(on, math.inf, torch.logit(rho_t))
    post = group_posterior(logit, s2, eta, lam)
    mean, var = post.weight_moments
    check_finite("the linear TDAMP posterior", mean, var)
    out = {"mean": mean.squeeze(-1), "var": var.squeeze(-1), "inclusion": post.inclusion, "rho": rho_t,
           "noise_var": v, "iterations": torch.tensor(it), "damping": torch.tensor(damping), "messages": (eta, lam)}
    if method == "ep":  # EP's fixed point matches moments; a run that stopped without it is no fixed point
        sigma = torch.cholesky_inverse(chol)
        m = sigma @ (shift + eta_b)
        mismatch = torch.maximum(((m - b_mean).abs() / b_var.sqrt()).max(),
                                 (torch.diagonal(sigma).unsqueeze(-1) / b_var - 1).abs().max())
        out["matched"] = bool(mismatch <= EP_MATCH_TOL)  # one host read
        converged = converged and out["matched"]
        out["log_evidence"] = _ep_log_evidence(y, v, chol, m, shift + eta_b, eta_b, lam_b, eta, lam,
                                               torch.logit(rho_t), on, s2)
    out["converged"] = torch.tensor(converged)
    return out


def _ep_log_evidence(y, v, chol, m, h, eta_b, lam_b, eta, lam, logit_rho, on, s2) -> torch.Tensor:
    """EP's ``log p(y)`` (:func:`linear_tdamp`): ``sum_i log C_i + log int N(y; A x, v I) prod_i
    exp(eta_B,i x_i - lam_B,i x_i^2 / 2) dx``; the integral is ``-m/2 log(2 pi v) - y^T y / (2 v) +
    Phi(h, P)`` with ``P = A^T A / v + diag lam_B`` (Cholesky factor ``chol``), ``h = A^T y / v +
    eta_B``, ``m = P^-1 h`` and ``Phi(h, P) = h^T P^-1 h / 2 - log det P / 2 + n/2 log 2 pi``;
    ``log C_i = log Z_i - phi(c mu + eta_B, c + lam_B) + phi(c mu, c)`` with the cavity ``(c mu, c) =
    (eta, lam)`` and ``phi(e, l) = e^2 / (2 l) - log(l) / 2 + log(2 pi) / 2``. An unknown ``on`` has the
    slab prior: ``log Z_i = log N(0; mu, 1/c + s^2)``."""
    log2pi = math.log(2 * math.pi)
    e, lc = eta.squeeze(-1), lam.squeeze(-1)
    eb, lb = eta_b.squeeze(-1), lam_b.squeeze(-1)

    def phi(e_, l_):
        return e_ * e_ / (2 * l_) - 0.5 * torch.log(l_) + 0.5 * log2pi

    llr = log_likelihood_ratio(eta, lam, s2.unsqueeze(-1)).squeeze(-1)
    mixture = torch.nn.functional.softplus(logit_rho + llr) - torch.nn.functional.softplus(logit_rho)
    log_z = -phi(e, lc) + torch.where(on, llr, mixture)  # log N(0; mu, 1/c) = -phi(c mu, c)
    log_c = log_z - phi(e + eb, lc + lb) + phi(e, lc)
    n, rows = len(e), len(y)
    gaussian = 0.5 * (h * m).sum() - torch.log(torch.diagonal(chol)).sum() + 0.5 * n * log2pi
    return log_c.sum() + gaussian - 0.5 * rows * torch.log(2 * math.pi * v) - (y @ y) / (2 * v)


def _clamped_marginals(A, y, rho, slab_var, noise_var, iterations, damping, tol, plain) -> dict[str, torch.Tensor]:
    """``"ep-clamped"`` (:func:`linear_tdamp`): each unknown's marginal from EP's evidences with its
    inclusion clamped on and off; plain EP's (``plain``) where a clamped problem has no EP fixed point
    (and for every unknown when plain EP has none)."""
    n = A.shape[1]
    mean, var, inclusion = plain["mean"].clone(), plain["var"].clone(), plain["inclusion"].clone()
    clamped = torch.zeros(n, dtype=torch.bool, device=A.device)
    logit_rho = math.log(rho) - math.log1p(-rho)
    eta, lam = plain.pop("messages")
    damping = float(plain["damping"])
    if not bool(plain["converged"]):  # no EP fixed point to start the clamped problems from (warned)
        return {"clamped": clamped}
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        try:  # each clamped problem starts from plain EP's messages
            on = _linear_turbo(A, y, rho, slab_var, noise_var, iterations, damping, tol, False, False, "ep",
                               clamped_on=i, start=(eta, lam))
            off = _linear_turbo(A[:, rest], y, rho, slab_var, noise_var, iterations, damping, tol, False, False,
                                "ep", start=(eta[rest], lam[rest]))
        except FloatingPointError:  # the start leaves the Gaussian part indefinite: no EP fixed point from there
            continue
        if not (bool(on["converged"]) and bool(off["converged"])):  # one host read per unknown
            continue
        p = torch.sigmoid(logit_rho + on["log_evidence"] - off["log_evidence"])
        mean[i] = p * on["mean"][i]
        var[i] = p * (on["var"][i] + on["mean"][i] ** 2) - mean[i] ** 2
        inclusion[i] = p
        clamped[i] = True
    return {"mean": mean, "var": var, "inclusion": inclusion, "clamped": clamped}


def _ep_module_b_messages(precision: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eta: torch.Tensor,
                          lam: torch.Tensor, eta_b: torch.Tensor | None, lam_b: torch.Tensor | None):
    """EP: Module B's extrinsic messages to the likelihood, ``N(M, V) / N(eta, lam)`` in natural
    parameters, the step from the previous ones (``None`` at the start) halved while ``precision +
    diag lam_B`` is not positive definite (:func:`linear_tdamp`). Returns ``eta_B``, ``lam_B`` and the
    Cholesky factor of ``precision + diag lam_B``."""
    new_lam, new_eta = var.reciprocal() - lam, mean / var - eta
    step = 1.0
    for _ in range(PD_BACKTRACKS):
        trial = new_lam if lam_b is None else lam_b + step * (new_lam - lam_b)
        chol, info = torch.linalg.cholesky_ex(precision + torch.diag(trial.squeeze(-1)))
        if int(info) == 0:  # one host read
            return (new_eta if eta_b is None else eta_b + step * (new_eta - eta_b)), trial, chol
        if lam_b is None:
            break
        step /= 2
    if lam_b is not None:
        chol, info = torch.linalg.cholesky_ex(precision + torch.diag(lam_b.squeeze(-1)))
    if lam_b is None or int(info) != 0:
        raise FloatingPointError("linear_tdamp (ep): the Gaussian part A^T A / v + diag(lam_B) is not positive "
                                 "definite")
    return eta_b, lam_b, chol


def _ep_cavities(chol: torch.Tensor, shift: torch.Tensor, eta_b: torch.Tensor, lam_b: torch.Tensor):
    """EP's Module A: the Gaussian part ``N(y; A x, v I) prod_i exp(eta_B,i x_i - lam_B,i x_i^2 / 2)``
    has precision ``P = A^T A / v + diag lam_B`` (Cholesky factor ``chol``) and precision-mean ``A^T y
    / v + eta_B`` (``shift = A^T y / v``); each unknown's cavity (the part without its own message)
    has precision ``1 / Sigma_ii - lam_B,i`` and precision-mean ``m_i / Sigma_ii - eta_B,i`` (``Sigma =
    P^-1``, ``m = Sigma (A^T y / v + eta_B)``). Returns the cavities' precision-means and precisions."""
    sigma = torch.cholesky_inverse(chol)
    m = sigma @ (shift + eta_b)
    diag = torch.diagonal(sigma).unsqueeze(-1)
    return m / diag - eta_b, diag.reciprocal() - lam_b


def propagate_linear(A: torch.Tensor, w_mean: torch.Tensor, w_var: torch.Tensor, bias: torch.Tensor,
                     score: torch.Tensor | None = None):
    """Module A's forward pass for one linear layer with known inputs ``A`` and a known ``bias``:
    output moments and the layer record that :func:`weight_messages` reads. ``score`` (``(m, K)``),
    if given, is GAMP's Onsager correction: the output means become ``A M + b - tau * score``."""
    mean, var = linear_moments(A, None, w_mean, w_var, bias, torch.zeros_like(bias))
    if score is not None:
        mean = mean - var * score
    mean.requires_grad_()
    var.requires_grad_()
    return mean, var, [LayerRecord("x", A, A * A, None, mean, var)]
