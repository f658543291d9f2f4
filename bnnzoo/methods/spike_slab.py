"""The group spike-and-slab prior sampled by EM-SGHMC (Ke & Fan 2022, arXiv:2210.12957): structured
pruning at the cost of SGD.

Model :class:`~bnnzoo.models.SpikeSlabPrior` (groups: hidden neurons and filters, or with
``groups="input"`` Ke & Fan's input columns and kernels); kernel :class:`~bnnzoo.guides.SGHMC`
(Chen, Fox & Guestrin 2014) with a diagonal preconditioner, pSGLD's RMSprop statistics (Li et al.
2016) or Ke & Fan's learned ``tau = sigmoid(rho)`` (``preconditioner="ke-fan"``: their adaptive
variational-Bayes optimiser read as SGHMC, with SGHMC's noise so that ``temperature`` keeps its
meaning), and a cyclical step size (Zhang et al. 2020), run by ``pyro.infer.MCMC``; EM
(:class:`~bnnzoo.guides.SpikeSlabEM`) updates the inclusion probabilities, the per-group weight
decays and the inclusion rate once per ``em_every`` epochs from epoch ``em_start``, and prunes the
groups whose inclusion probability falls below ``prune_threshold`` (from epoch ``prune_start``).

Schedule (``train`` options): ``epochs`` are cut into ``cycles`` cosine cycles of ``epochs //
cycles`` epochs; the first ``warmup_cycles`` are warm-up (nothing is kept); every later cycle
contributes its last ``samples_per_cycle`` states, ``thinning`` epochs apart. With ``min_steps``
(regression's default 36,000), cycles are added until the chain runs at least that many minibatch
steps: a rule of the number of rows, more cycles (posterior modes) on fewer rows, chosen on
validation parts (docs/methods/spike-slab-sghmc.md). The stored posterior thus holds ``num_chains *
(cycles - warmup_cycles) * samples_per_cycle`` weight samples, ``cycles`` as :meth:`schedule` sets it.

Defaults. EM starts almost at once (``em_start``: 2 epochs), while the weights are still near
PyTorch's initialisation and inside the spike: the groups that the likelihood grows leave it for the
slab, the others are held by the spike's strong decay and pruned from ``prune_start``. Once a group
sits in the slab at temperature 1 its weights spread to the slab's scale and EM cannot move it back,
so the decision is made early.
The preconditioner is RMSprop and the groups are neurons and filters: on validation data (the
last 20% of Boston training splits, a random 20% of MNIST train5k) Ke & Fan's learned ``tau`` did
no better on Boston and worse on MNIST. EM prunes a group when its inclusion probability falls
below 0.5 (the median probability rule; validation could not tell it from the former 1e-3).
Both tasks divide the scales by the square root of each layer's fan-in, so that the norm below
which a group leaves the slab is the same for a layer of any width. Regression: ``s1 = 2``,
``s0 = 0.4`` (chosen on validation parts over absolute scales ``s1 = 1``, ``s0 = 0.2``, whose
threshold grows with the fan-in), temperature 1, the noise scale learned by its M-step.
Classification: ``s1 = 3``, ``s0 = 0.15`` and a cold posterior, temperature 0.005, under which
unsupported groups shrink into the spike and are pruned while supported ones stay; the temperature
was chosen on three validation fifths of MNIST train5k by the one-standard-error rule (the sparsest
of the temperatures whose validation NLL is within one standard error of the lowest;
docs/methods/spike-slab-sghmc.md).

One-shot pruning after the fit (:meth:`SpikeSlabPosterior.prune`): the posterior inclusion
probability of a group is estimated by the E-step averaged over the stored draws of its chain
(with that chain's final ``pi``); groups whose estimate is below ``threshold`` in every chain
(default 0.5: the median probability model) are removed from every draw. No rule empties a layer
(:func:`~bnnzoo.models.sparsity.protect_layers`, unless ``allow_empty``). The pruning is recorded
in ``fit_state.pruning`` (rule ``"threshold"``). docs/methods/spike-slab-sghmc.md lists every
departure from Ke & Fan's algorithm and how the defaults were chosen.
"""

from __future__ import annotations

import math

import torch

from ..catalog import TRAINING_OPTIONS, CatalogEntry, Option, register
from ..data.augment import augmentation
from ..errors import ConfigError
from ..guides.sghmc import PRECONDITIONER_KINDS, PRECONDITIONERS, SGHMC
from ..guides.spike_slab_em import SpikeSlabEM, inclusion_probability
from ..models.likelihoods import check_scale
from ..models.sparsity import protect_layers
from ..models.spike_slab import (
    FIRST_LAYER_GROUPS,
    GROUPINGS,
    SCALINGS,
    SpikeSlabPrior,
    dead_units,
)
from ..posterior import PruningRecord
from ..sampling import SamplePosterior
from .baselines import build_model, scale_option

NAME = "spike-slab-sghmc"


class SpikeSlabPosterior(SamplePosterior):
    """EM-SGHMC samples under the group spike-and-slab prior (see the module docstring)."""

    def schedule(self, num_data: int) -> dict:
        """The run in minibatch steps and kernel samples for ``num_data`` training examples: cycles of
        ``epochs // cycles`` epochs, ``cycles`` of them, or with ``min_steps`` as many more as it
        takes to run at least that many minibatch steps (``"cycles"`` in the result)."""
        t = self.config["train"]
        spe = math.ceil(num_data / t["batch_size"])
        cycles, warm = int(t["cycles"]), int(t["warmup_cycles"])
        if not 0 <= warm < cycles:
            raise ConfigError(f"warmup_cycles must be in [0, cycles), got {warm} with cycles={cycles}")
        cycle_epochs = int(t["epochs"]) // cycles
        if cycle_epochs < 1:
            raise ConfigError(f"{t['epochs']} epochs cannot hold {cycles} cycles")
        if t.get("min_steps"):  # a rule of n: more cycles (posterior modes) on fewer rows
            cycles = max(cycles, math.ceil(int(t["min_steps"]) / (cycle_epochs * spe)))
        s, thin = int(t["samples_per_cycle"]), int(t["thinning"])
        if (s - 1) * thin >= cycle_epochs:
            raise ConfigError(f"{s} samples {thin} epochs apart do not fit in cycles of {cycle_epochs} epochs")
        return {"steps_per_epoch": spe, "cycles": cycles, "cycle_length": cycle_epochs * spe, "samples_per_cycle": s,
                "thinning": thin * spe, "warmup_steps": warm * s, "num_samples": (cycles - warm) * s,
                "em_start": int(round(t["em_start"] * spe)), "em_every": max(1, int(round(t["em_every"] * spe))),
                "prune_start": int(round(t["prune_start"] * spe))}

    def _make_kernel(self, num_data: int):
        t, g = self.config["train"], self.config["guide"]
        plan = self.schedule(num_data)
        em = SpikeSlabEM(self.model.prior, start=plan["em_start"], every=plan["em_every"],
                         prune_threshold=t["prune_threshold"], prune_start=plan["prune_start"])
        kernel = SGHMC(self.model, step_size=t["lr"], friction=g["friction"], temperature=g["temperature"],
                       batch_size=t["batch_size"], precondition=g["precondition"], precond_decay=g["precond_decay"],
                       precond_eps=g["precond_eps"], cycle_length=plan["cycle_length"],
                       samples_per_cycle=plan["samples_per_cycle"], thinning=plan["thinning"], em=em,
                       learn_noise=t.get("learn_noise", True), method=self.name,
                       preconditioner=g.get("preconditioner", "rmsprop"), tau_lr=g.get("tau_lr", 0.1),
                       augment=augmentation(t.get("augment")))
        return kernel, plan["warmup_steps"], plan["num_samples"]

    # ---- inclusion probabilities and one-shot pruning -----------------------------------------------
    @torch.no_grad()
    def inclusion_probabilities(self, per_draw: bool = False) -> dict[str, torch.Tensor]:
        """Per grouped layer, the E-step averaged over each chain's stored draws (with the chain's
        final ``pi``): shape ``(chain, G)``; with ``per_draw``, at every draw: ``(chain, draw, G)``."""
        self._require_fitted()
        prior = self.model.prior
        out = {}
        for lay in prior.layouts:
            per_chain = []
            for c, state in enumerate(self.chain_state):
                draws = {s: v[c] for s, v in self.samples.items()}
                pi = state["pi"].to(self.device)
                p = inclusion_probability(lay.squared_norms(draws), lay.size, pi, *prior.scales(lay.layer))
                per_chain.append(p if per_draw else p.mean(0))
            out[lay.layer] = torch.stack(per_chain)
        return out

    def arviz_hyperparameters(self, num_draws: int) -> dict[str, torch.Tensor]:
        """ArviZ's per-draw inclusion probabilities, ``"<layer>.inclusion_probability"``."""
        return {f"{layer}.inclusion_probability": p for layer, p in self.inclusion_probabilities(True).items()}

    @torch.no_grad()
    def _prune(self, threshold: float = 0.5, allow_empty: bool = False) -> None:
        """Remove the groups whose estimated posterior inclusion probability is below ``threshold``
        in every chain (zeroed in all draws, masked; recorded in ``fit_state.pruning``). The decision
        goes through :func:`~bnnzoo.models.sparsity.protect_layers` (score: the largest estimate over
        the chains, among the groups some chain still keeps): a layer it would empty keeps its best
        group, with an :class:`~bnnzoo.models.sparsity.EmptyLayerWarning`, unless ``allow_empty``."""
        threshold = float(threshold)
        if not 0 < threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        probs = self.inclusion_probabilities()
        layouts = self.model.prior.layouts
        rule, score = {}, {}
        for lay in layouts:
            p = probs[lay.layer]
            alive = self._alive_groups(lay)
            rule[lay.layer] = (p >= threshold).any(0) & alive
            score[lay.layer] = torch.where(alive, p.max(0).values, torch.full_like(p[0], -1.0))
        keep = protect_layers(rule, score, allow_empty=bool(allow_empty))
        for lay in layouts:
            k = keep[lay.layer]
            for site in lay.sites():
                view = lay.view(site, k.to(self.samples[site].dtype))
                self.samples[site] = self.samples[site] * view
                self.chain_masks[site] = self.chain_masks[site] & lay.expand(site, k)
        self._mask_dead_units(keep)
        self.fit_state.pruning.append(PruningRecord("threshold", {"threshold": threshold,
                                                                  "allow_empty": bool(allow_empty)}))

    def _alive_groups(self, lay) -> torch.Tensor:
        """Groups of ``lay`` that some chain kept through the run (``True``)."""
        mask = self.chain_masks[lay.weight_site].any(0)  # (*weight shape)
        if lay.axis == "out":
            return mask.flatten(1).any(1)
        if lay.axis == "kernel":
            return mask.flatten(2).any(2).flatten()
        return mask.transpose(0, 1).flatten(1).any(1)

    def _mask_dead_units(self, keep: dict[str, torch.Tensor]) -> None:
        """Input groups: zero and mask every unit whose outgoing groups are all pruned."""
        net = self.model.prior.net
        for name, alive in dead_units(net, self.model.prior.layouts, keep).items():
            layer = net.layer(name)
            for site in (f"{name}.weight", f"{name}.bias"):
                shape = layer.weight_shape if site.endswith("weight") else (layer.num_groups,)
                rows = alive.view(-1, *([1] * (len(shape) - 1)))
                self.samples[site] = self.samples[site] * rows.to(self.samples[site].dtype)
                if site not in self.chain_masks:
                    self.chain_masks[site] = torch.ones(self.num_chains, *shape, dtype=torch.bool, device=alive.device)
                self.chain_masks[site] = self.chain_masks[site] & rows


def check_prior_scales(prior: SpikeSlabPrior) -> None:
    """Raise :class:`~bnnzoo.errors.ConfigError` naming the option when a scale the sampler uses (the
    spike, slab and output scales of every layer, after the ``fan_in`` scaling) lies outside the range
    float32 can square and invert (:func:`~bnnzoo.models.likelihoods.check_scale`): a spike of
    ``1e-30`` has the precision ``1e60``, which overflows, and the chain's loss turns NaN."""
    for lay in prior.layouts:
        factor = prior.layer_factor(lay.layer)
        spike, slab = prior.scales(lay.layer)
        check_scale("spike_scale" if factor == 1 else f"spike_scale / sqrt(fan_in) of layer {lay.layer}", spike)
        check_scale("slab_scale" if factor == 1 else f"slab_scale / sqrt(fan_in) of layer {lay.layer}", slab)
    for site in prior.net.sites():
        if prior.grouped_site(site) is None:
            layer = site.rpartition(".")[0]
            name = "output_scale" if layer == prior.net.param_layers[-1].name else "slab_scale"
            check_scale(name if prior.layer_factor(layer) == 1 else f"{name} / sqrt(fan_in) of layer {layer}",
                        prior.fixed_scale(site))


def _create(config: dict, device="cpu") -> SpikeSlabPosterior:
    m = config["model"]

    def prior(net):
        made = SpikeSlabPrior(net, m["slab_scale"], m["spike_scale"], m["a"], m["b"], m["output_scale"],
                              m["first_layer"], m["scaling"], m.get("groups", "output"))
        check_prior_scales(made)
        return made

    model = build_model(config, prior)
    return SpikeSlabPosterior(model, name=NAME, config=config, device=device)


# regression's scales per fan-in, chosen on validation parts (docs/methods/spike-slab-sghmc.md)
_MODEL = {"slab_scale": 2.0, "spike_scale": 0.4, "a": 1.0, "b": 1.0, "output_scale": None, "first_layer": "neurons",
          "scaling": "fan_in", "groups": "output"}
_GUIDE = {"friction": 0.1, "temperature": 1.0, "preconditioner": "rmsprop", "precondition": "always",
          "precond_decay": 0.99, "precond_eps": 1e-5, "tau_lr": 0.1}
_CHAINS = {"num_chains": 1, "mp_context": None}
_OPTIONS = {
    **TRAINING_OPTIONS,
    "lr": Option(float, gt=0, help="SGHMC's base step size eps_0 (the peak of each cosine cycle)"),
    "slab_scale": scale_option(help="standard deviation s1 of the slab (above spike_scale)"),
    "spike_scale": scale_option(help="standard deviation s0 of the spike (below slab_scale)"),
    "a": Option(float, gt=0, help="Beta(a, b) prior of the inclusion rate: a"),
    "b": Option(float, gt=0, help="Beta(a, b) prior of the inclusion rate: b"),
    "output_scale": scale_option(nullable=True,
                           help="standard deviation of the output layer's Gaussian prior; null: slab_scale"),
    "first_layer": Option(str, choices=FIRST_LAYER_GROUPS, help="group the first layer by neurons or by inputs"),
    "scaling": Option(str, choices=SCALINGS, help="absolute scales, or divided by sqrt(fan_in) per layer"),
    "groups": Option(str, choices=GROUPINGS,
                     help="what one inclusion indicator covers: 'output' = a hidden neuron or filter (its weight row "
                          "and bias; structured pruning of units), 'input' = Ke & Fan's groups, the input columns of "
                          "every dense layer (output layer included) and the k x k kernels of every conv layer"),
    "noise_scale": scale_option(help="regression: the noise scale the chain starts from (learned with "
                                            "learn_noise; null is refused)"),
    "friction": Option(float, gt=0, le=1, help="SGHMC friction alpha (1 - alpha is the momentum)"),
    "temperature": Option(float, ge=0, help="posterior temperature (1: the posterior; below 1: colder)"),
    "preconditioner": Option(str, choices=PRECONDITIONER_KINDS,
                             help="the diagonal preconditioner: 'rmsprop' (pSGLD's running mean of squared gradients, "
                                  "damped by sqrt(d)/N) or 'ke-fan' (Ke & Fan 2022's learned tau = sigmoid(rho) in "
                                  "(0, 1), rho moved by their entropy and noise-times-gradient terms)"),
    "precondition": Option(str, choices=PRECONDITIONERS,
                           help="when the preconditioner adapts: 'warmup' (then frozen: exact SGHMC), 'always', or "
                                "'none' (the identity)"),
    "precond_decay": Option(float, ge=0, lt=1, help="rmsprop: decay of the running mean of squared gradients"),
    "precond_eps": Option(float, gt=0, help="rmsprop: the preconditioner's floor"),
    "tau_lr": Option(float, gt=0, help="ke-fan: step size of rho (their eta; 0.1 in their code)"),
    "cycles": Option(int, ge=1, help="cosine step-size cycles (epochs // cycles epochs each; with min_steps: the "
                                     "fewest)"),
    "min_steps": Option(int, ge=1, nullable=True,
                        help="at least this many minibatch steps: cycles of epochs // cycles epochs are added until "
                             "the chain runs that many (more cycles, so more posterior modes, on fewer rows); null: "
                             "cycles as given (giving epochs or cycles without min_steps sets it to null)"),
    "warmup_cycles": Option(int, ge=0, help="cycles of warm-up, nothing kept (below cycles)"),
    "samples_per_cycle": Option(int, ge=1, help="states kept at the end of each later cycle"),
    "thinning": Option(int, ge=1, help="epochs between kept states"),
    "em_start": Option(float, ge=0, help="epoch of the first EM update"),
    "em_every": Option(float, gt=0, help="epochs between EM updates"),
    "prune_start": Option(float, ge=0, help="epoch from which EM prunes groups"),
    "prune_threshold": Option(float, gt=0, lt=1,
                              help="EM prunes a group whose inclusion probability falls below this (0.5: the median "
                                   "probability rule; chosen on validation data, docs/methods/spike-slab-sghmc.md)"),
    "learn_noise": Option(bool, help="regression: learn the noise scale (else it stays at noise_scale)"),
    "num_chains": Option(int, ge=1, help="independent chains"),
    "mp_context": Option(str, choices=("spawn", "fork", "forkserver"), nullable=True,
                         help="multiprocessing start method of parallel chains; null: spawn on CUDA, else torch's"),
}


def _check_schedule(config: dict) -> None:
    """The prior's scales and the cyclical schedule must fit together: ``spike_scale <
    slab_scale``, ``warmup_cycles < cycles``, at least one epoch per cycle and the kept states of a
    cycle inside it (``(samples_per_cycle - 1) * thinning < epochs // cycles``)."""
    m, t = config["model"], config["train"]
    if not m["spike_scale"] < m["slab_scale"]:
        raise ConfigError(f"{NAME}: option 'spike_scale' must be below 'slab_scale', got spike_scale="
                          f"{m['spike_scale']} with slab_scale={m['slab_scale']}")
    if not t["warmup_cycles"] < t["cycles"]:
        raise ConfigError(f"{NAME}: option 'warmup_cycles' must be below 'cycles', got warmup_cycles="
                          f"{t['warmup_cycles']} with cycles={t['cycles']}")
    cycle_epochs = t["epochs"] // t["cycles"]
    if cycle_epochs < 1:
        raise ConfigError(f"{NAME}: options 'epochs' and 'cycles': {t['epochs']} epochs cannot hold {t['cycles']} "
                          "cycles (at least one epoch per cycle)")
    if (t["samples_per_cycle"] - 1) * t["thinning"] >= cycle_epochs:
        raise ConfigError(f"{NAME}: options 'samples_per_cycle' and 'thinning': {t['samples_per_cycle']} samples "
                          f"{t['thinning']} epochs apart do not fit in cycles of {cycle_epochs} epochs "
                          f"(epochs={t['epochs']}, cycles={t['cycles']})")

register(CatalogEntry(
    name=NAME,
    summary="Group spike-and-slab prior, EM-SGHMC (RMSprop or Ke & Fan's learned preconditioner, cyclical "
            "step size), neuron/filter or input-column/kernel pruning",
    paper="Ke & Fan 2022, On the optimization and pruning for Bayesian deep learning (arXiv:2210.12957; "
          "EM-MCMC, and their adaptive optimiser as preconditioned SGHMC); Chen, Fox & Guestrin 2014, Stochastic "
          "gradient Hamiltonian Monte Carlo; Li et al. 2016, Preconditioned SGLD (pSGLD, the RMSprop "
          "preconditioner); Zhang et al. 2020, Cyclical stochastic gradient MCMC",
    tasks=("regression", "classification"),
    create=_create,
    defaults={
        "regression": {
            "model": {**_MODEL, "noise_scale": 0.5}, "guide": dict(_GUIDE),
            "train": {"epochs": 600, "min_steps": 36000, "batch_size": 32, "lr": 3e-3, "cycles": 6, "warmup_cycles": 1,
                      "samples_per_cycle": 5, "thinning": 10, "em_start": 2, "em_every": 1, "prune_start": 30,
                      "prune_threshold": 0.5, "learn_noise": True, **_CHAINS}},
        "classification": {
            "model": {**_MODEL, "slab_scale": 3.0, "spike_scale": 0.15},
            "guide": {**_GUIDE, "temperature": 0.005},  # chosen on validation data: docs/methods/spike-slab-sghmc.md
            "train": {"epochs": 20, "min_steps": None, "batch_size": 128, "lr": 5e-4, "augment": None, "cycles": 4,
                      "warmup_cycles": 1,
                      "samples_per_cycle": 2, "thinning": 1, "em_start": 2, "em_every": 1, "prune_start": 4,
                      "prune_threshold": 0.5, **_CHAINS}},
    },
    options=_OPTIONS,
    checks=(_check_schedule,),
))
