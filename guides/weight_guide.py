"""What every guide over a network's weights shares (sites, pruning masks, weight draws, registration with
Pyro), and :class:`PyroAutoGuide`, a Pyro autoguide standing in for a catalog guide."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide, init_to_value
from torch import nn

from ..models.bnn import register_with_pyro
from ..models.errors import ConfigError
from .sites import SiteBuffers

#: The scale a guide gives a pruned weight's Gaussian: exactly-zero scales are not valid Normal
#: distributions, and the square of a much smaller one underflows in float32.
PRUNED_SCALE = 1e-12


class WeightGuide(nn.Module, ABC):
    """Base of the guides over a :class:`~bnnzoo.models.BayesianNeuralNetwork`'s weights.

    Subclasses implement ``forward`` (a Pyro guide: samples every latent site of the model),
    :meth:`draw` (one posterior draw of every weight, plain torch), :meth:`posterior_mean` and, for
    fast training, :meth:`sample_outputs_and_kl` (see :class:`~bnnzoo.guides.LocalReparamELBO`).

    ``masks`` holds a boolean tensor per pruned site (``True`` = kept). A pruned weight is exactly
    zero in every draw and in the exported network.

    A guide whose parameters are trained by gradient (:attr:`pyro_trainable`) registers them with
    Pyro on every call, under the name :attr:`pyro_name`
    (:func:`~bnnzoo.models.bnn.register_with_pyro`): ``pyro.infer.SVI(model, guide, pyro.optim...)``
    then trains the guide's own tensors in place, exactly as the catalog's fit does. The catalog's
    fast training path (:meth:`sample_outputs_and_kl`) does not call the guide and is unaffected.
    """

    #: the prefix of the guide's parameters in Pyro's param store
    pyro_name = "guide"
    #: whether the guide's parameters are fitted by gradient (registered with Pyro when called)
    pyro_trainable = True

    def __call__(self, *args, **kwargs):
        if self.pyro_trainable:
            register_with_pyro(self.pyro_name, self)
        return super().__call__(*args, **kwargs)

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        self.masks = SiteBuffers()

    # ---- pruning ----------------------------------------------------------------------------
    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Prune: keep only the weights whose mask is ``True`` (masks only ever shrink)."""
        sites = self.net.sites()
        for site, keep in masks.items():
            if site not in sites:
                raise KeyError(f"unknown site {site!r}; sites are {list(sites)}")
            if tuple(keep.shape) != tuple(sites[site]):
                raise ValueError(f"mask for {site} has shape {tuple(keep.shape)}, expected {sites[site]}")
            keep = keep.to(dtype=torch.bool, device=self._device())
            if site in self.masks:
                keep = keep & self.masks[site]
            self.masks[site] = keep

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a saved guide, pruning masks included (they exist only once a guide is pruned)."""
        prefix = "masks.layers."
        saved = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for site, keep in saved.items():
            self.masks[site] = keep.to(self._device())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def mask(self, site: str) -> torch.Tensor | None:
        return self.masks.get(site)

    def apply_masks(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: (v * self.masks[s] if s in self.masks else v) for s, v in params.items()}

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    # ---- draws ------------------------------------------------------------------------------
    @abstractmethod
    def draw(self) -> dict[str, torch.Tensor]:
        """One posterior draw of every weight site (pruned weights zero)."""

    @abstractmethod
    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """The posterior mean of every weight site (pruned weights zero)."""


class PyroAutoGuide(WeightGuide):
    """A Pyro autoguide (``AutoNormal``, ``AutoDelta``, ``AutoDiagonalNormal``...) over the weights of a
    model whose only latent sites are the network's weights (a Gaussian prior: ``map``,
    ``meanfield-vi``), usable wherever a catalog guide is.

    ``autoguide`` is an autoguide class, built as ``autoguide(model, init_loc_fn=init_to_value(...))``
    with the weights PyTorch's layer initialisation gives (as the catalog's guides start), or a
    callable ``model -> AutoGuide`` for other settings. The autoguide is set up at once on a dummy
    example, so its parameters exist (and an optimiser can be built) before any fit.

    Called as a Pyro guide it is the autoguide itself (Pyro's param-store semantics apply).
    :meth:`sample_outputs_and_kl`, :meth:`draw` and :meth:`posterior_mean` run it with
    module-local parameters (``pyro.settings`` ``module_local_params``), so the catalog's fit trains
    this guide's own tensors whatever the param store holds. The training loss is the Monte Carlo
    negative ELBO of one weight draw: ``log q(w) - log p(w)`` (no closed form for an arbitrary
    autoguide; for ``AutoDelta`` it is the MAP objective ``-log p(w)``) minus the scaled
    log-likelihood. The posterior mean is the autoguide's ``median()`` (its location). A posterior
    with an autoguide fits, predicts and evaluates; it cannot be saved (its state is not a catalog
    guide's): ``state_dict`` raises :class:`~bnnzoo.errors.ConfigError`.
    """

    pyro_trainable = False  # the autoguide registers its own parameters when called

    def __init__(self, model, autoguide):
        super().__init__(model)
        with pyro.settings.context(module_local_params=True):  # its parameters usable module-locally
            if isinstance(autoguide, type) and issubclass(autoguide, AutoGuide):
                init = self.net.init_params()
                auto = autoguide(model, init_loc_fn=init_to_value(values=init))
            elif callable(autoguide):
                auto = autoguide(model)
            else:
                auto = None
        if not isinstance(auto, AutoGuide):
            raise ConfigError(f"guide must be a Pyro autoguide class or a callable model -> AutoGuide, "
                              f"got {autoguide!r}")
        self.autoguide = auto
        x = torch.zeros((1,) + tuple(self.net.input_shape))
        y = torch.zeros(1, dtype=torch.long if model.task == "classification" else torch.float32)
        with pyro.settings.context(module_local_params=True), torch.no_grad():
            self.autoguide(x, y)  # sets up the prototype and creates the parameters
        latent = set(self._latent_sites())
        if latent != set(self.net.sites()):
            raise ConfigError(f"an autoguide can stand in only for a guide over the network's weights; the "
                              f"model's latent sites are {sorted(latent)}")

    def _latent_sites(self) -> list[str]:
        trace = self.autoguide.prototype_trace
        return [name for name, node in trace.nodes.items()
                if node["type"] == "sample" and not node["is_observed"]]

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        return self.autoguide(x, y, num_data)

    def _trace(self):
        with pyro.settings.context(module_local_params=True):
            return poutine.trace(self.autoguide).get_trace()

    def draw(self) -> dict[str, torch.Tensor]:
        trace = self._trace()
        return self.apply_masks({site: trace.nodes[site]["value"].detach() for site in self.net.sites()})

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        with pyro.settings.context(module_local_params=True), torch.no_grad():
            median = self.autoguide.median()
        return self.apply_masks({site: median[site].detach() for site in self.net.sites()})

    def sample_outputs_and_kl(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs for one draw of the weights and ``log q(w) - log p(w)`` at that draw."""
        trace = self._trace()
        weights, kl = {}, torch.zeros((), device=x.device)
        for site in self.net.sites():
            node = trace.nodes[site]
            weights[site] = node["value"]
            kl = kl + node["fn"].log_prob(node["value"]).sum()
            kl = kl - model.prior.site_distribution(site).log_prob(node["value"]).sum()
        return self.net(x, self.apply_masks(weights)), kl

    def state_dict(self, *args, **kwargs):
        raise ConfigError("a posterior fitted with an autoguide cannot be saved or checkpointed; save a "
                          "catalog guide's fit, or the autoguide's own parameters with torch.save")
