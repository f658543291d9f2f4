"""Stochastic-gradient Hamiltonian Monte Carlo over a Bayesian network's weights, as a Pyro
``MCMCKernel`` (Chen, Fox & Guestrin 2014; preconditioning as pSGLD, Li et al. 2016, or as Ke &
Fan 2022's adaptive optimiser; cyclical step sizes, Zhang et al. 2020; EM for the spike-and-slab
prior, Ke & Fan 2022).

The potential of weights ``theta`` on a minibatch ``B`` of ``N`` training examples is

    U(theta) = -(N/|B|) sum_{n in B} ln p(y_n | x_n, theta) + sum_sites d * ||theta_site||^2 / 2

with ``d`` the prior precision: ``1/scale^2`` for a :class:`~bnnzoo.models.GaussianPrior`, the EM
decays ``d_g`` for a :class:`~bnnzoo.models.SpikeSlabPrior` (see :mod:`bnnzoo.guides.spike_slab_em`).
One minibatch step with step size ``eps`` (in learning-rate units: the update of ``theta`` per step
is about ``eps`` times the preconditioned mean gradient), friction ``alpha`` and temperature ``T``:

    S     <- rho S + (1 - rho) (grad U / N)^2          (RMSprop statistics; only while adapting)
    G     =  1 / (sqrt(S) + lambda + sqrt(d) / N)       (diagonal preconditioner; 1 without one)
    v     <- (1 - alpha) v - (eps/N) G grad U + Normal(0, 2 alpha (eps/N) G T)
    theta <- theta + v

This is SGHMC with the diagonal mass matrix ``N/G`` and the gradient-noise estimate taken as 0; with
``G`` held fixed it leaves ``exp(-U/T)`` invariant up to the discretisation error
(:func:`sghmc_update`). Two choices of ``G`` (``preconditioner``):

``"rmsprop"`` (pSGLD's statistics, as above). The damping term
``sqrt(d)/N`` is the mean gradient of the prior term at a typical prior draw (``|theta| ~ d^-1/2``): it
bounds ``(eps/N) G d``, the squared frequency of the prior's harmonic force per step, by
``eps sqrt(d)``, so that weights without a likelihood gradient (dead units, irrelevant inputs) or in
the stiff spike stay stable instead of getting ``G = 1/lambda``.

``"ke-fan"`` (Ke & Fan 2022, "On the optimization and pruning for Bayesian deep learning", their
adaptive variational-Bayes optimiser read as SGHMC): ``G = tau = sigmoid(rho)`` per weight, in
``(0, 1)``, starting at ``1/2``. Before each step's momentum update ``rho`` takes a step on the
gradient in ``tau`` of the per-example negative ELBO of ``q = N(theta, (s tau)^2)``
(:func:`ke_fan_rho_gradient`):

    rho <- rho - tau_lr * ( s^2 (d/N) tau + s xi_prev (g/N) - 1/(N tau) ),    s = eps^(3/4) / sqrt(N)

with ``g`` the likelihood part of ``grad U``, ``xi_prev`` the standard normal draws injected at the
previous step (zero before the first and at ``T = 0``) and ``eps`` the current step size (their
``C^2``; their ``T = N^(-1/2)`` in ``s = T C^(3/2)``, as in their regression notebooks and README).
The entropy term ``-1/(N tau)`` pushes ``tau`` up, the prior and curvature terms down. Their
optimiser carries ``m`` and steps ``theta += tau m``; here the momentum ``v`` is kept in ``theta``
units and ``tau`` enters as ``G`` above, which is the same iteration while ``tau`` is fixed (and a
higher-order difference while it moves by ``O(tau_lr/N)`` per step). Their momentum coefficient
0.1 is ``friction = 0.9``. Their injected noise, ``sqrt(2 + 2 beta^2) C^(3/2) T tau xi`` in ``theta``,
is replaced by SGHMC's ``sqrt(2 alpha (eps/N) tau T) xi`` so that the chain samples ``exp(-U/T)``:
theirs is SGHMC at the weight- and step-dependent temperature ``tau (1 + beta^2) sqrt(eps) / (1 - beta)``
(``beta = 0.1``; for ``eps = 1e-2``, ``tau = 1/2``: about ``0.056``).

The preconditioner adapts during warm-up and is frozen afterwards (``precondition="warmup"``, exact
sampling), adapts throughout (``"always"``, pSGLD without its correction term; Ke & Fan's optimiser)
or is the identity (``"none"``).

Cyclical step size over cycles of ``L`` steps (global step ``k = 1, 2, ...``):

    eps_k = eps_0 / 2 * (cos(pi * ((k - 1) mod L) / L) + 1)

One kernel *sample* runs several minibatch steps: with cycles, the samples of a cycle are its last
``samples_per_cycle`` points, ``thinning`` steps apart (the first sample of a cycle also runs its
exploration phase); without cycles every sample is ``thinning`` steps. ``pyro.infer.MCMC`` stores
each sample of the sites in ``save_params`` (default: the weight sites).

Fast path. The gradient is plain torch: ``Network.forward`` and the likelihood's ``log_prob`` on the
weight tensors, ``torch.autograd.grad``, and the prior term added analytically; the update is a
handful of fused ``torch._foreach_*`` calls. For a Gaussian likelihood the minibatch term is the sum
of squared residuals over ``2 sigma^2`` (``log_prob`` up to a constant in ``theta``: one fused op
instead of seven; the tests check its gradient against ``log_prob``'s and Pyro's log joint).
Tracing the Pyro model for every gradient (``poutine.trace(...).log_prob_sum()`` and a backward pass)
gives the same gradient at a higher cost, most of all for small networks, where Pyro's per-site
bookkeeping dominates. The Pyro model remains the statement of what is believed: it is
``kernel.model``, ``Predictive`` runs on the samples, and the tests check the potential against its
log joint.

Memory: between steps the kernel keeps the weights, the momentum and one preconditioner tensor
(the RMSprop statistics ``S`` while adapting, ``sqrt(S)`` once frozen; Ke & Fan ``sqrt(tau)`` once
frozen): three times the parameters, plus three small per-group vectors for EM (decay,
preconditioner offset, mask; see :meth:`state_bytes`). Ke & Fan's preconditioner while it adapts
keeps two tensors, ``rho`` and the previous step's draws: four times the parameters (their code
keeps six: ``rho``, ``tau``, momentum, noise and two masks). Nothing is copied to the host inside
an epoch: the epoch's loss is read back once at its end, where the shared epoch loop
(:class:`~bnnzoo.guides.training.EpochLoop`, without a progress bar: ``MCMC`` has its own) times the epoch, stops a diverging chain with
:class:`~bnnzoo.guides.training.DivergenceError` (a non-finite or exploding loss) and runs the
callback; the per-sample diagnostics stay on the device until :meth:`diagnostics`.

A chain can diverge without a non-finite loss: with a step size far too large the weights grow by
orders of magnitude in the first epoch, the learned noise scale follows the residuals, and the loss
(per example, ``ln sigma + 1/2``) then stays flat at a value no relative test can tell from a slow
fit. So every epoch is also compared with the trivial prediction (:meth:`SGHMC.check_fit`): a
Gaussian chain whose residuals' root mean square exceeds ``DIVERGENCE_FACTOR`` (10) times that of
the targets (the residuals of predicting 0, i.e. the standardised targets' mean), or a categorical
chain whose mean negative log-likelihood exceeds 10 times that of a uniform guess (``ln K``), is
stopped with :class:`~bnnzoo.guides.training.DivergenceError` naming the epoch, the step and the
step size. A working chain stays within a small factor of both from its first epoch on.

Several chains: ``MCMC(kernel, ..., num_chains=C)`` runs chains in processes when the machine has
the cores (the kernel pickles without its data or callback; use ``mp_context="spawn"`` with CUDA)
and one after the other otherwise; :meth:`setup` starts every chain from a fresh initialisation.

Data parallel: set up inside :func:`~bnnzoo.guides.data_parallel.data_parallel`, every rank runs the
same chain: the initial weights are broadcast from rank 0, every rank draws the same global minibatch
and computes the likelihood gradient of its contiguous part of it scaled by ``N/|B|``; one
``all_reduce`` per step sums those gradients (with the batch statistic), which gives the 1-rank
minibatch gradient, and the injected noise comes from the random state all ranks share (seeded
alike), so the preconditioner, EM and noise updates agree too and the ranks hold one chain, the
chain of a 1-rank run on the same global minibatches.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from ..models.likelihoods import GaussianLikelihood
from ..models.priors import GaussianPrior
from ..models.spike_slab import SpikeSlabPrior
from .data_parallel import all_reduce_flat, broadcast_, current
from .spike_slab_em import SpikeSlabEM
from .training import DivergenceError, EpochLoop, TrainingHistory, minibatches

PRECONDITIONERS = ("warmup", "always", "none")
#: which diagonal preconditioner ``G``: RMSprop statistics (pSGLD) or Ke & Fan's learned ``tau``
PRECONDITIONER_KINDS = ("rmsprop", "ke-fan")

#: a chain whose epoch fits the data this many times worse than a constant prediction has diverged
#: (see :meth:`SGHMC.check_fit`)
DIVERGENCE_FACTOR = 10.0


def cyclical_step_size(k: int, step_size: float, cycle_length: int | None) -> float:
    """``eps_k`` of the cosine cyclical schedule (``k`` 1-based); constant without cycles."""
    if cycle_length is None:
        return step_size
    return 0.5 * step_size * (math.cos(math.pi * ((k - 1) % cycle_length) / cycle_length) + 1.0)


def ke_fan_noise_scale(step_size: float, num_data: int) -> float:
    """Ke & Fan's scale ``s = T C^(3/2)`` of their variational standard deviation ``sigma = s tau``,
    with ``C = sqrt(step_size)`` and their ``T = N^(-1/2)``: ``s = step_size^(3/4) / sqrt(N)``."""
    return step_size ** 0.75 / math.sqrt(num_data)


def ke_fan_rho_gradient(tau: torch.Tensor, xi: torch.Tensor, lik_grad: torch.Tensor, decay, step_size: float,
                        num_data: int) -> torch.Tensor:
    """The gradient that moves Ke & Fan's dual variable ``rho`` (``tau = sigmoid(rho)``), for one site:

        r = s^2 (d/N) tau + s xi (g/N) - 1/(N tau),        s = ke_fan_noise_scale(step_size, N)

    ``g`` is the gradient of the likelihood part of ``U`` (``-(N/B) grad sum_B ln p``) and ``d`` the
    prior precision, so ``g/N`` and ``d/N`` are their per-example gradient and weight decay; ``xi``
    is the standard normal draw injected at the previous step (zero before the first). It is the
    derivative in ``tau`` of the per-example negative ELBO of ``q = N(theta, (s tau)^2)``: the prior
    term ``d E_q[w^2] / 2N``, the likelihood term through the reparameterisation ``w = mu + s tau xi``
    (``s xi g/N``), and the entropy ``-(1/N) ln(s tau)``."""
    s = ke_fan_noise_scale(step_size, num_data)
    return (s * s / num_data) * decay * tau + (s / num_data) * xi * lik_grad - 1.0 / (num_data * tau)


def sghmc_update(params: list[torch.Tensor], momentum: list[torch.Tensor], grad_u: list[torch.Tensor],
                 root_g: list[torch.Tensor], noise: list[torch.Tensor] | None, step_size: float, friction: float,
                 temperature: float, num_data: int) -> None:
    """One SGHMC step, in place (``grad_u`` is overwritten):

        v     <- (1 - alpha) v - (eps/N) G grad U + sqrt(2 alpha (eps/N) G T) xi
        theta <- theta + v

    ``root_g`` is ``sqrt(G)`` per site (broadcasting), ``noise`` the standard normal draws ``xi``
    (``None`` at ``T = 0``). Computed as ``v <- (1 - alpha) v + alpha zeta`` with ``zeta = sqrt(G)
    ((sigma/alpha) xi - (eps/(N alpha)) sqrt(G) grad U)``, ``sigma^2 = 2 alpha (eps/N) T``, in fused
    ``torch._foreach_*`` calls."""
    alpha, n = friction, num_data
    torch._foreach_mul_(grad_u, root_g)  # sqrt(G) grad U
    if temperature > 0:
        sigma = math.sqrt(2.0 * alpha * step_size * temperature / n)
        xi = torch._foreach_mul(noise, sigma / alpha)
        torch._foreach_add_(xi, grad_u, alpha=-step_size / (n * alpha))
    else:
        xi = grad_u
        torch._foreach_mul_(xi, -step_size / (n * alpha))
    torch._foreach_mul_(xi, root_g)
    torch._foreach_lerp_(momentum, xi, alpha)
    torch._foreach_add_(params, momentum)


def _check(name: str, value, low: float, high: float = math.inf, integer: bool = False, low_open=False):
    bad = isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
    if not bad:
        bad = not (low < value if low_open else low <= value) or not value <= high
    if bad:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return value


class SGHMC(MCMCKernel):
    """SGHMC over the weights of ``model`` (a :class:`~bnnzoo.models.BayesianNeuralNetwork`); see the
    module docstring for the update, the schedule and what one sample is.

    ``step_size`` ``eps_0``; ``friction`` ``alpha`` in ``(0, 1]`` (``1 - alpha`` is the momentum
    coefficient of SGD with momentum); ``temperature`` ``T`` (1 samples the posterior, 0 optimises);
    ``batch_size``; ``preconditioner`` (``"rmsprop"`` or ``"ke-fan"``), ``precondition``
    (``"warmup"``, ``"always"``, ``"none"``: when it adapts), ``precond_decay`` ``rho`` and
    ``precond_eps`` ``lambda`` (RMSprop), ``tau_lr`` (Ke & Fan: the step size of their ``rho``,
    0.1 in their code); ``cycle_length`` in steps (``None``: constant step size),
    ``samples_per_cycle``, ``thinning`` in steps. With a spike-and-slab prior, ``em`` is the
    :class:`~bnnzoo.guides.SpikeSlabEM` schedule (a default one if not given). ``learn_noise``:
    for a Gaussian likelihood, the noise scale gets an M-step at the end of every epoch,
    ``sigma^2 = (sum of squared residuals over the epoch) / N``. ``method`` names the fit in a
    :class:`~bnnzoo.guides.training.DivergenceError`.

    Run it with ``pyro.infer.MCMC(kernel, num_samples, warmup_steps).run(x, y)``: ``setup`` keeps
    the (standardised) data and the kernel draws its own minibatches from it; the first
    ``warmup_steps`` samples are the warm-up, counted here (Pyro's driver never calls
    ``end_warmup``). ``on_epoch_end(epoch, loss)``, if set, runs after every epoch of an in-process
    chain (``loss`` = mean negative log-likelihood per example over the epoch). A chain whose loss
    becomes non-finite or explodes raises :class:`~bnnzoo.guides.training.DivergenceError` at the
    end of that epoch.
    """

    def __init__(self, model, step_size: float = 1e-3, friction: float = 0.1, temperature: float = 1.0,
                 batch_size: int = 32, *, precondition: str = "warmup", precond_decay: float = 0.99,
                 precond_eps: float = 1e-5, cycle_length: int | None = None, samples_per_cycle: int = 1,
                 thinning: int = 1, em: SpikeSlabEM | None = None, learn_noise: bool = True,
                 method: str = "SGHMC", preconditioner: str = "rmsprop", tau_lr: float = 0.1,
                 augment=None):
        for attr in ("net", "prior", "likelihood"):
            if not hasattr(model, attr):
                raise TypeError(f"SGHMC samples a BayesianNeuralNetwork (net, prior, likelihood); "
                                f"{type(model).__name__} has no {attr!r}")
        self.model = model
        self.transforms = {}  # the weights are unconstrained: MCMC needs no transforms (and no setup pass)
        #: data augmentation: each minibatch's inputs -> the inputs the step sees (global random state)
        self.augment = augment
        self.step_size = float(_check("step_size", step_size, 0, low_open=True))
        self.friction = float(_check("friction", friction, 0, 1, low_open=True))
        self.temperature = float(_check("temperature", temperature, 0))
        self.batch_size = int(_check("batch_size", batch_size, 1, integer=True))
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        self.precondition = precondition
        if preconditioner not in PRECONDITIONER_KINDS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONER_KINDS}, got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.tau_lr = float(_check("tau_lr", tau_lr, 0, low_open=True))
        self.precond_decay = float(_check("precond_decay", precond_decay, 0, 1 - 1e-12))
        self.precond_eps = float(_check("precond_eps", precond_eps, 0, low_open=True))
        self.samples_per_cycle = int(_check("samples_per_cycle", samples_per_cycle, 1, integer=True))
        self.thinning = int(_check("thinning", thinning, 1, integer=True))
        if cycle_length is not None:
            cycle_length = int(_check("cycle_length", cycle_length, 1, integer=True))
            if (self.samples_per_cycle - 1) * self.thinning >= cycle_length:
                raise ValueError(f"{self.samples_per_cycle} samples {self.thinning} steps apart do not fit in a "
                                 f"cycle of {cycle_length} steps")
        self.cycle_length = cycle_length
        prior = model.prior
        if isinstance(prior, SpikeSlabPrior):
            self.em = em if em is not None else SpikeSlabEM(prior)
            if self.em.prior is not prior:
                raise ValueError("em was built for another prior than the model's")
        elif isinstance(prior, GaussianPrior):
            if em is not None:
                raise ValueError("EM needs a SpikeSlabPrior; this model's prior is a GaussianPrior")
            self.em = None
        else:
            raise TypeError(f"SGHMC supports GaussianPrior and SpikeSlabPrior weights, not {type(prior).__name__}")
        self.learn_noise = bool(learn_noise) and hasattr(model.likelihood, "log_noise_scale")
        # Gaussian likelihood: the minibatch term is the sum of squared residuals (module docstring)
        self._gaussian = isinstance(model.likelihood, GaussianLikelihood)
        self.sites = list(model.net.sites())
        self._save_params = sorted(self.sites)
        self._user_init: dict | None = None
        self.method = str(method)
        self.on_epoch_end = None
        self._x = self._y = None
        self._loop: EpochLoop | None = None
        self._parallel = None
        self._ready = False

    # ---- Pyro's kernel interface ------------------------------------------------------------------
    def output_sites(self) -> list[str]:
        """The names a sample holds: the weight sites, the network's state buffers (a module's
        normalisation statistics at the draw), and with EM ``pi`` and ``<layer>.inclusion_prob``."""
        extra = ["pi"] + [f"{lay.layer}.inclusion_prob" for lay in self.em.layouts] if self.em else []
        return self.sites + list(self.model.net.state_buffers()) + extra

    @property
    def save_params(self) -> list[str]:
        """The sites ``MCMC`` stores (sorted: ``MCMC`` unpacks the stored vectors in sorted order)."""
        return self._save_params

    @save_params.setter
    def save_params(self, names) -> None:
        names = sorted(set(names))
        unknown = [n for n in names if n not in self.output_sites()]
        if unknown:
            raise KeyError(f"unknown sites {unknown} in save_params; a sample holds {self.output_sites()}")
        self._save_params = names

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        """The current weights (after :meth:`setup`) or the user's initial weights."""
        if self._ready:
            return self._current()
        return dict(self._user_init) if self._user_init is not None else {}

    @initial_params.setter
    def initial_params(self, params) -> None:
        shapes = self.model.net.sites()
        missing = [s for s in shapes if s not in params]
        if missing:
            raise KeyError(f"initial_params lacks the sites {missing}")
        for site, shape in shapes.items():
            if tuple(params[site].shape) != tuple(shape):
                raise ValueError(f"initial_params[{site!r}] has shape {tuple(params[site].shape)}, expected {shape}")
        self._user_init = {s: params[s].detach() for s in shapes}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["on_epoch_end"] = None  # callbacks belong to the process that set them
        state["_x"] = state["_y"] = None  # setup hands every process its data
        state["_batches"] = None  # the current epoch's batch iterator
        state["_loop"] = None  # epoch loops: a fresh process builds its own
        state["_ready"] = False  # the copy needs setup
        state["_parallel"] = None  # a process group belongs to its process
        return state

    def setup(self, warmup_steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the data ``x``, ``y`` and start a fresh chain (weights from ``initial_params`` if
        set, else PyTorch's initialisation drawn from the global random state)."""
        if not torch.is_tensor(x) or not torch.is_tensor(y):
            raise TypeError("SGHMC.setup expects tensors x and y (run MCMC as mcmc.run(x, y))")
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must hold the same positive number of examples, got {len(x)} and {len(y)}")
        device = x.device
        if y.device != device:
            raise ValueError(f"x is on {device} but y on {y.device}")
        wrong = {t.device for t in [*self.model.parameters(), *self.model.buffers()]} - {device}
        if wrong:
            raise ValueError(f"the data are on {device} but the model on {sorted(map(str, wrong))}: "
                             f"move the model with model.to({str(device)!r})")
        self._x, self._y, self._n = x, y, len(x)
        self._warmup = int(warmup_steps)
        self._steps_per_epoch = math.ceil(self._n / self.batch_size)
        init = self._user_init if self._user_init is not None else self.model.net.init_params(device=device)
        self._params = [init[s].detach().to(device).clone().requires_grad_(True) for s in self.sites]
        # data parallel (guides.data_parallel): every rank holds the one chain, started from rank 0's point
        self._parallel = current()
        if self._parallel is not None:
            broadcast_(self._params, self._parallel)
        self._numels = [p.numel() for p in self._params]
        self._numel = sum(self._numels)
        self._param_dict = dict(zip(self.sites, self._params))
        self._momentum = [torch.zeros_like(p) for p in self._params]
        # the identity when there is no warm-up to adapt in
        self._mode = "none" if self.precondition == "warmup" and self._warmup == 0 else self.precondition
        adapting = self._mode != "none"
        rmsprop, ke_fan = adapting and self.preconditioner == "rmsprop", adapting and self.preconditioner == "ke-fan"
        self._stats = [torch.zeros_like(p) for p in self._params] if rmsprop else None
        # Ke & Fan: rho = 0 (tau = 1/2) and the previous step's standard normal draws (none before the first)
        self._rho = [torch.zeros_like(p) for p in self._params] if ke_fan else None
        self._xi_flat = torch.zeros(self._numel, device=device) if ke_fan else None
        self._xi = ([t.view(p.shape) for t, p in zip(self._xi_flat.split(self._numels), self._params)]
                    if ke_fan else None)
        self._frozen = None  # sqrt(S) (RMSprop) or sqrt(tau) (Ke & Fan) once the preconditioner is frozen
        self._adapt_steps = 0
        if self.em is not None:
            self.em.reset(device)
            self._decays = [self.em.decays()[s] for s in self.sites]
            keep = self.em.keep_views()
        else:
            prior = self.model.prior
            self._decays = [torch.tensor(prior.site_scale(s) ** -2, device=device) for s in self.sites]
            keep = {}
        one = torch.ones((), device=device)
        self._keep = [keep.get(s, one) for s in self.sites]
        # the preconditioner's offset lambda + sqrt(d)/N (+inf for pruned groups, whose sqrt(G) is then 0):
        # per-group vectors, updated in place after every EM update, or scalars
        self._offset_groups = {}
        self._offset = []
        for s, d in zip(self.sites, self._decays):
            lay = self.em.prior.grouped_site(s) if self.em is not None else None
            if lay is None:
                self._offset.append(d.sqrt() / self._n + self.precond_eps)
            else:
                if lay.layer not in self._offset_groups:
                    self._offset_groups[lay.layer] = self.em.decay[lay.layer].sqrt() / self._n + self.precond_eps
                self._offset.append(lay.view(s, self._offset_groups[lay.layer]))
        self._step = 0
        self._drawn = 0
        self._batches = iter(())
        self._epoch_step = 0
        # running sums over the epoch and over the current kernel sample of the minibatch statistic:
        # squared residuals (Gaussian likelihood) or negative log-likelihoods (any other)
        self._epoch_stat = torch.zeros((), device=device)
        self._sample_stat = torch.zeros((), device=device)
        if self.learn_noise:
            # the noise M-step writes in place: the chain gets storage of its own, since a model that MCMC
            # sent to a spawned worker shares its tensors' memory with the sender and the other chains
            log_s = self.model.likelihood.log_noise_scale
            log_s.data = log_s.detach().clone()
        self._inv_var = self._inverse_noise_variance()
        self._reference = self._trivial_statistic(y)
        self._sample_examples = 0
        self._eta = cyclical_step_size(1, self.step_size, self.cycle_length)
        self._history = {k: [] for k in ("step", "step_size", "potential", "groups_pruned_fraction",
                                         "weights_pruned_fraction", "pi", "noise_scale", "warmup")}
        if self.preconditioner == "ke-fan" and adapting:
            self._history["tau_mean"] = []
        self._loop = self._new_loop()
        self._ready = True

    def _new_loop(self) -> EpochLoop:
        # MCMC decides how many samples (and so epochs) a chain runs: the loop has no total and no bar
        return EpochLoop(0, method=self.method, progress=False, on_epoch_end=self._epoch_callback)

    def cleanup(self) -> None:
        """Drop the data references (the chain's state stays for inspection)."""
        self._x = self._y = None

    def logging(self) -> dict:
        return {"step_size": f"{self._eta:.2e}", "epoch": self._loop.epoch if self._loop is not None else 0}

    def sample(self, params=None) -> dict[str, torch.Tensor]:
        """Run the minibatch steps up to the next collection point; return the weights there (and,
        with EM, ``pi`` and the inclusion probabilities). The kernel keeps its own state: ``params``
        is ignored."""
        if not self._ready or self._x is None:
            raise RuntimeError("SGHMC.sample before setup: run it through pyro.infer.MCMC(kernel, ...).run(x, y)")
        target = self._target_step(self._drawn)
        while self._step < target:
            self._one_step()
        self._drawn += 1
        if self._drawn == self._warmup and self._mode == "warmup":
            self._freeze_preconditioner()
        self._record()
        return self._current()

    def diagnostics(self) -> dict:
        """The chain's record: ``history`` per sample (global step, step size, potential, pruned
        fractions, ``pi``, noise scale, warm-up flag; plain lists), ``epochs`` (a
        :class:`~bnnzoo.guides.training.TrainingHistory`: loss and seconds per epoch), the final
        ``masks``, ``noise_scale``, ``state_bytes`` and, with EM, its state ``em`` (CPU tensors)."""
        history = {}
        for key, values in self._history.items():
            tensor = bool(values) and torch.is_tensor(values[0])
            history[key] = torch.stack(values).cpu().tolist() if tensor else list(values)
        loop = self._loop.history if self._loop is not None else TrainingHistory()
        epochs = TrainingHistory(loss=list(loop.loss), epoch_seconds=list(loop.epoch_seconds))
        out = {"history": history, "epochs": epochs, "masks": {k: v.cpu() for k, v in self.masks().items()},
               "noise_scale": self._noise_scale_value(), "state_bytes": self.state_bytes()}
        if self.em is not None:
            out["em"] = self.em.state(self.weights())
        return out

    # ---- state ------------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """The pruning masks of the current chain (``True`` = kept), grouped sites only."""
        return self.em.masks() if self.em is not None else {}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the tensors the kernel keeps between steps: the weights, the sampler state
        (momentum and preconditioner) and the per-group EM vectors (decays, preconditioner offsets,
        boolean masks and ``pi``)."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts) if ts is not None else 0

        em = 0
        if self.em is not None:
            em = size([*self.em.decay.values(), *self.em.keep.values(), *self._offset_groups.values(), self.em.pi])
        held = self._frozen if self._frozen is not None else self._stats
        if held is None and self._rho is not None:
            held = [*self._rho, self._xi_flat]
        return {"weights": size(self._params), "momentum": size(self._momentum),
                "preconditioner": size(held), "em": em}

    def _current(self) -> dict[str, torch.Tensor]:
        out = {s: p.detach().clone() for s, p in zip(self.sites, self._params)}
        out.update(self.model.net.state_buffers())  # a module's BatchNorm statistics belong to this draw
        if self.em is not None:
            out["pi"] = self.em.pi.clone()
            with torch.no_grad():
                out.update({f"{k}.inclusion_prob": v for k, v in self.em.probabilities(self._param_dict).items()})
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights (views of the chain's state; do not modify)."""
        return {s: p.detach() for s, p in zip(self.sites, self._params)}

    # ---- the potential ------------------------------------------------------------------------------
    def potential(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
                  num_data: int | None = None) -> torch.Tensor:
        """``U(theta)`` on the batch ``x, y`` scaled to ``num_data`` examples (default: the data of
        :meth:`setup`), with the current prior precisions; ``params`` default to the chain's weights."""
        params = self.weights() if params is None else params
        n = num_data if num_data is not None else self._n
        nll = -(n / len(x)) * self.model.likelihood.log_prob(self.model.net(x, params), y).sum()
        decays = dict(zip(self.sites, self._decays))
        return nll + sum(0.5 * (decays[s] * params[s].pow(2)).sum() for s in self.sites)

    # ---- the sampler --------------------------------------------------------------------------------
    def _target_step(self, j: int) -> int:
        """The global step count at the end of kernel sample ``j`` (0-based)."""
        if self.cycle_length is None:
            return (j + 1) * self.thinning
        c, r = divmod(j, self.samples_per_cycle)
        return (c + 1) * self.cycle_length - (self.samples_per_cycle - 1 - r) * self.thinning

    def _next_batch(self) -> torch.Tensor:
        if self._epoch_step == 0:
            if self._x.device.type == "cuda":
                torch.cuda.synchronize(self._x.device)
            self._loop.begin_epoch()
            self._batches = minibatches(self._n, self.batch_size, self._x.device)
        return next(self._batches)

    def _one_step(self) -> None:
        self._step += 1
        eta = self._eta = cyclical_step_size(self._step, self.step_size, self.cycle_length)
        idx = self._next_batch()
        if self._parallel is None:
            xb = self._x[idx] if self.augment is None else self.augment(self._x[idx])
            grads, stat = self.minibatch_gradient(xb, self._y[idx])
        else:
            grads, stat = self._parallel_gradient(idx)
        with torch.no_grad():
            torch._foreach_add_([self._epoch_stat, self._sample_stat], stat.detach())
            self._sample_examples += len(idx)
            if self._rho is not None:  # Ke & Fan: tau from the likelihood gradient, before the prior is added
                self._update_tau(grads, eta)
            # grad U = -(N/B) grad loglik + d * theta
            torch._foreach_addcmul_(grads, self._params, self._decays)
            root_g = self._root_preconditioner(grads)
            noise = None
            if self.temperature > 0:
                flat = self._xi_flat if self._xi_flat is not None else torch.empty(self._numel, device=self._x.device)
                flat.normal_()
                noise = self._xi if self._xi is not None else [t.view(p.shape) for t, p in
                                                                zip(flat.split(self._numels), self._params)]
            sghmc_update(self._params, self._momentum, grads, root_g, noise, eta, self.friction, self.temperature,
                         self._n)
            if self.em is not None and self.em.due(self._step):
                self._em_update()
        self._epoch_step += 1
        if self._epoch_step == self._steps_per_epoch:
            self._end_epoch()

    def _parallel_gradient(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Data parallel: the global minibatch ``idx``'s likelihood gradient and statistic, from this
        rank's contiguous part of it (:meth:`~bnnzoo.guides.data_parallel.DataParallel.bounds`) scaled
        by ``N / |idx|`` and summed over the ranks in one collective; the sum is the 1-rank
        :meth:`minibatch_gradient` of the global batch (the mean of the ranks' estimates scaled by
        ``W N / |idx|``). Every rank then takes the same step: the injected noise comes from the
        random state that all ranks share, so the ranks hold one chain."""
        if self.augment is None:
            local = self._parallel.slice(idx)
            xb, yb = self._x[local], self._y[local]
        else:  # the global batch augmented alike on every rank (shared random state), then this rank's rows
            start, stop = self._parallel.bounds(len(idx))
            xb, yb = self.augment(self._x[idx])[start:stop], self._y[idx][start:stop]
        grads, stat = self.minibatch_gradient(xb, yb, batch=len(idx))
        *grads, stat = all_reduce_flat([*grads, stat.detach()], self._parallel)
        return grads, stat

    def _update_tau(self, lik_grads: list[torch.Tensor], eta: float) -> None:
        """Ke & Fan's step on ``rho`` (:func:`ke_fan_rho_gradient`, with the previous step's draws)."""
        n = self._n
        s = ke_fan_noise_scale(eta, n)
        tau = torch._foreach_sigmoid(self._rho)
        r = torch._foreach_mul(tau, self._decays)
        torch._foreach_mul_(r, s * s / n)  # s^2 (d/N) tau
        torch._foreach_addcmul_(r, self._xi, lik_grads, value=s / n)  # + s xi (g/N)
        torch._foreach_reciprocal_(tau)
        torch._foreach_add_(r, tau, alpha=-1.0 / n)  # - 1/(N tau)
        torch._foreach_add_(self._rho, r, alpha=-self.tau_lr)

    def draws(self) -> dict[str, torch.Tensor] | None:
        """The standard normal draws ``xi`` injected at the last step, per site, which Ke & Fan's next
        ``rho`` step reads (kept only while their preconditioner adapts; ``None`` otherwise)."""
        if self._xi is None:
            return None
        return {s: x.detach().clone() for s, x in zip(self.sites, self._xi)}

    def tau(self) -> dict[str, torch.Tensor] | None:
        """Ke & Fan's preconditioner ``tau`` per site (frozen or current), or ``None`` for RMSprop or none."""
        if self.preconditioner != "ke-fan" or self._mode == "none":
            return None
        if self._frozen is not None:
            return {s: r.pow(2) for s, r in zip(self.sites, self._frozen)}
        return {s: torch.sigmoid(r) for s, r in zip(self.sites, self._rho)}

    def minibatch_gradient(self, xb: torch.Tensor, yb: torch.Tensor,
                           batch: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The gradient of the likelihood part of ``U``, ``-(N/B) grad sum_B ln p(y|x, theta)``, at the
        chain's weights (one list entry per site), and the batch's summed statistic (squared residuals
        for a Gaussian likelihood, negative log-likelihoods otherwise). Plain torch, no Pyro trace.
        ``batch``: ``B``, the size of the minibatch that ``xb`` is part of (default ``len(xb)``; a
        data-parallel rank passes the global batch's)."""
        n, batch = self._n, len(xb) if batch is None else int(batch)
        f = self.model.net(xb, self._param_dict)
        if self._gaussian:  # -ln p(y|f) = (y - f)^2 / (2 sigma^2) + const
            stat = F.mse_loss(f.squeeze(-1), yb, reduction="sum")
            scaled = stat * (self._inv_var * (0.5 * n / batch))
        else:
            stat = -self.model.likelihood.log_prob(f, yb).sum()
            scaled = stat * (n / batch)
        return list(torch.autograd.grad(scaled, self._params)), stat

    def _root_preconditioner(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``sqrt(G)`` per site, pruned entries zero (updating the RMSprop statistics if adapting):
        RMSprop ``1/sqrt(sqrt(S) + lambda + sqrt(d)/N)``, Ke & Fan ``sqrt(tau)``."""
        if self._mode == "none":
            return self._keep
        if self.preconditioner == "ke-fan":
            if self._frozen is not None:
                return torch._foreach_mul(self._frozen, self._keep)
            root = torch._foreach_sigmoid(self._rho)
            torch._foreach_sqrt_(root)
            torch._foreach_mul_(root, self._keep)
            return root
        if self._frozen is not None:
            root = torch._foreach_add(self._frozen, self._offset)
        else:
            n = self._n
            if self._adapt_steps == 0:  # start the average at the first squared gradient (no zero bias)
                torch._foreach_addcmul_(self._stats, grads, grads, value=1.0 / n**2)
            else:
                torch._foreach_mul_(self._stats, self.precond_decay)
                torch._foreach_addcmul_(self._stats, grads, grads, value=(1.0 - self.precond_decay) / n**2)
            self._adapt_steps += 1
            root = torch._foreach_sqrt(self._stats)
            torch._foreach_add_(root, self._offset)
        torch._foreach_rsqrt_(root)  # 1/sqrt(sqrt(S) + lambda + sqrt(d)/N); 0 where the offset is inf
        return root

    def _freeze_preconditioner(self) -> None:
        """End of warm-up: keep ``sqrt(S)`` (RMSprop, in place of the statistics ``S``) or
        ``sqrt(tau)`` (Ke & Fan, in place of ``rho`` and the draws) from now on."""
        with torch.no_grad():
            if self.preconditioner == "ke-fan":
                self._frozen = torch._foreach_sigmoid(self._rho)
                torch._foreach_sqrt_(self._frozen)
                self._rho = self._xi = self._xi_flat = None
                return
            torch._foreach_sqrt_(self._stats)
        self._frozen, self._stats = self._stats, None

    def _em_update(self) -> None:
        self.em.update(self._param_dict, self._step)
        for layer, offset in self._offset_groups.items():
            torch.sqrt(self.em.decay[layer], out=offset).div_(self._n).add_(self.precond_eps)
            offset.masked_fill_(~self.em.keep[layer], math.inf)
        # pruned groups: momentum zero (and sqrt(G) zero), so that they stay exactly zero
        torch._foreach_mul_(self._momentum, self._keep)

    def _trivial_statistic(self, y: torch.Tensor) -> float:
        """The per-example statistic of the trivial prediction: the mean squared target (predicting 0)
        for a Gaussian likelihood, ``ln K`` (a uniform guess over ``K`` classes) otherwise."""
        if self._gaussian:
            mean_square = float(y.detach().double().pow(2).mean())
            return mean_square if mean_square > 0 else 1.0
        return math.log(max(int(self.model.net.output_dim), 2))

    def check_fit(self, statistic: float, examples: int) -> None:
        """Raise :class:`~bnnzoo.guides.training.DivergenceError` when the summed minibatch statistic
        of ``examples`` examples (squared residuals, or negative log-likelihoods) is non-finite or
        ``DIVERGENCE_FACTOR`` times worse than the trivial prediction (the module docstring)."""
        per_example = statistic / max(examples, 1)
        epoch = self._loop.epoch if self._loop is not None else 0
        where = f"at step {self._step} (base step size {self.step_size:g})"
        if not math.isfinite(per_example):
            what = "squared residuals" if self._gaussian else "log-likelihood"
            raise DivergenceError(self.method, epoch, per_example,
                                  f"the loss is not finite: the {what} overflowed {where}")
        if self._gaussian:
            ratio = math.sqrt(per_example / self._reference)
            if ratio > DIVERGENCE_FACTOR:
                raise DivergenceError(
                    self.method, epoch, per_example,
                    f"the residuals' root mean square is {ratio:.3g} times the targets' {where}, worse than a "
                    f"constant prediction: the step size (lr) is most likely too large for this data")
        elif per_example > DIVERGENCE_FACTOR * self._reference:
            raise DivergenceError(
                self.method, epoch, per_example,
                f"the mean negative log-likelihood {per_example:.4g} is over {DIVERGENCE_FACTOR:g} times a uniform "
                f"guess's ({self._reference:.3g}) {where}: the step size (lr) is most likely too large for this data")

    def _end_epoch(self) -> None:
        """Divergence check against the trivial prediction, noise M-step, then the epoch loop's end of
        epoch: timing, check of the loss, callback."""
        self.check_fit(float(self._epoch_stat), self._n)
        loss = self._nll(self._epoch_stat, self._n) / self._n
        if self.learn_noise:  # sigma^2 = the epoch's sum of squared residuals / N
            with torch.no_grad():
                log_s = self.model.likelihood.log_noise_scale
                log_s.copy_(0.5 * torch.log(self._epoch_stat.clamp_min(1e-12) / self._n))
            self._inv_var = self._inverse_noise_variance()
        if self._x.device.type == "cuda":
            torch.cuda.synchronize(self._x.device)
        self._epoch_step = 0
        self._epoch_stat = torch.zeros((), device=self._x.device)
        self._loop.end_epoch(loss)

    def _epoch_callback(self, epoch: int, loss: float) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, loss)

    def _record(self) -> None:
        """Per-sample diagnostics, kept on the device."""
        h = self._history
        with torch.no_grad():
            decays = dict(zip(self.sites, self._decays))
            prior = sum(0.5 * (decays[s] * p.detach().pow(2)).sum() for s, p in zip(self.sites, self._params))
            examples = max(self._sample_examples, 1)
            nll = self._n * self._nll(self._sample_stat, examples) / examples
            h["potential"].append(nll + prior)
        self._sample_stat = torch.zeros((), device=self._x.device)
        self._sample_examples = 0
        h["step"].append(self._step)
        h["step_size"].append(self._eta)
        h["warmup"].append(self._drawn <= self._warmup)
        if self.em is not None:
            groups, weights = self.em.pruned_fractions()
            h["groups_pruned_fraction"].append(groups)
            h["weights_pruned_fraction"].append(weights)
            h["pi"].append(self.em.pi.clone())
        if self.learn_noise:
            h["noise_scale"].append(self.model.likelihood.log_noise_scale.detach().exp())
        if "tau_mean" in h:
            with torch.no_grad():
                h["tau_mean"].append(sum(t.sum() for t in self.tau().values()) / self._numel)

    def _inverse_noise_variance(self) -> torch.Tensor | None:
        if not self._gaussian:
            return None
        return torch.exp(-2.0 * self.model.likelihood.log_noise_scale.detach())

    def _nll(self, stat: torch.Tensor, examples: int) -> torch.Tensor:
        """The negative log-likelihood of ``examples`` examples from their summed statistic."""
        if not self._gaussian:
            return stat
        log_s = self.model.likelihood.log_noise_scale.detach()
        return 0.5 * stat * torch.exp(-2.0 * log_s) + examples * (log_s + 0.5 * math.log(2 * math.pi))

    def _noise_scale_value(self) -> float | None:
        lik = self.model.likelihood
        return float(lik.noise_scale.detach()) if hasattr(lik, "log_noise_scale") else None
