"""Networks given as the user's own ``torch.nn.Module``: how a module reaches the catalog's builders.

A configuration is plain data (it is saved as JSON), so it names a user's module instead of holding
it: ``network = {"arch": "module", "module": <class name>}``. The module itself is supplied to the
builders for the duration of a :func:`~bnnzoo.create`, :func:`~bnnzoo.fit` or :func:`~bnnzoo.load`
call (:func:`supplying`), and :func:`module_network` wraps it as a
:class:`~bnnzoo.models.module_network.ModuleNetwork`. A saved run records the module's sites and
input shape; loading it needs the module again (``bnnzoo.load(path, module=...)``), and a module
whose layers differ from the saved ones is refused. A plain ``nn.Sequential`` of the built-in
layer kinds runs as the built-in chain, with its fast paths.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError
from .models.module_network import ModuleNetwork
from .models.networks import Network, chain_from_sequential

MODULE_ARCH = "module"

_SUPPLIED: ContextVar[nn.Module | None] = ContextVar("bnnzoo_supplied_module", default=None)


def module_spec(module: nn.Module) -> dict:
    """The ``network`` entry of a configuration whose network is ``module``."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return {"arch": MODULE_ARCH, "module": type(module).__name__}


@contextmanager
def supplying(module: nn.Module | None) -> Iterator[None]:
    """Make ``module`` the network that configurations naming a user module are built with."""
    token = _SUPPLIED.set(module)
    try:
        yield
    finally:
        _SUPPLIED.reset(token)


def is_module_config(config: dict) -> bool:
    return isinstance(config.get("network"), dict) and config["network"].get("arch") == MODULE_ARCH


def check_saved_sites(net, saved: dict, name: str) -> None:
    """Raise :class:`ConfigError` unless ``net`` has the sites and input shape a saved run's
    ``network_spec`` (:meth:`ModuleNetwork.spec`) records."""
    if ({k: list(v) for k, v in net.sites().items()} != dict(saved.get("sites", {}))
            or list(net.input_shape) != list(saved.get("input_shape", []))):
        raise ConfigError(f"the module given ({name}) does not match the saved run's network "
                          f"{saved.get('module')!r}: its layers or input shape differ")


def module_network(config: dict) -> ModuleNetwork | Network:
    """The network of a configuration naming a user module, from the module supplied now: a plain
    ``nn.Sequential`` of the chain's layer kinds becomes that chain
    (:func:`~bnnzoo.models.networks.chain_from_sequential`: fused fast paths, closed-form
    predictives, em-tdamp), any other module a :class:`ModuleNetwork`. A saved run's chain needs no
    module (its ``network_spec`` describes it); a module's is checked against the module given."""
    saved = config.get("network_spec")
    if saved is not None and "layers" in saved:
        return Network.from_spec(saved)
    module = _SUPPLIED.get()
    name = config["network"].get("module", "a module")
    if module is None:
        raise ConfigError(f"this network is the user module {name}: pass the module again (module=...)")
    net = chain_from_sequential(module, tuple(config["input_shape"]))
    if net is not None:
        try:
            outputs = net(torch.zeros((1,) + net.input_shape), net.init_params()).shape[-1]
        except RuntimeError as exc:
            raise ConfigError(f"module {name} does not run on inputs of shape {net.input_shape}: {exc}") from exc
    else:
        net = ModuleNetwork(module, tuple(config["input_shape"]), name=name)
        outputs = net.output_dim
    if saved is not None:
        check_saved_sites(net, saved, name)
    if outputs != config["output_dim"]:
        raise ConfigError(f"module {name} has {outputs} outputs, the data need {config['output_dim']}")
    return net
