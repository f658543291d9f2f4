"""The Flower ``ClientApp`` of federated EM-TDAMP and of the FedAvg baseline (Flower's Message API).

A client answers two kinds of message from the ServerApp (:mod:`.server_app`):

- ``query.statistics`` (once, before the first round): its name, number of examples and the
  moments of its data (:mod:`.standardize`), in the records ``"config"``, ``"metrics"`` and
  ``"arrays"``;
- ``train`` (each round it is sampled for): the global posterior (EM-TDAMP, :mod:`.codec`) or the
  global weights (FedAvg: the network's state dict, as Flower's ``FedAvg`` strategy sends it) in
  the ``ArrayRecord`` ``"arrays"``, and in the ``ConfigRecord`` ``"config"`` the round's settings
  (its number: ``round``, or Flower's ``server-round`` in FedAvg's messages), the standardiser,
  the method and the server's posterior configuration (so every client builds exactly the
  server's network and options). It runs its local epochs (:class:`~.client.TDAMPClient`,
  :class:`~.fedavg.AdamClient`) and replies with its local posterior or trained state dict
  (``"arrays"``) and the ``MetricRecord`` ``"metrics"`` (``num-examples``, the key by which
  Flower's ``FedAvg`` weighs the replies, and the log evidence or the training loss): the one
  ``ArrayRecord`` and one ``MetricRecord`` that strategy expects. FedAvg's Adam state stays with
  the node between the rounds it takes part in, in the node's Flower ``Context.state``.

A local fit that fails (a bnnzoo error such as a diverging client, or any other exception of the
local computation) is answered with Flower's error reply naming the client and the reason; the
server counts that client as failed for the round.

Which data a client holds: :func:`client_app` with ``data`` and ``parts`` (a simulation: part
``partition-id`` of ``parts``, Flower's node config of a simulated SuperNode), or, deployed
(:data:`app`), part ``partition-id`` of ``num-partitions`` of the run's dataset (the run config's
``dataset``, ``split``, ``partition``, ``alpha`` and ``seed``), or the whole training split of the
node's own ``dataset`` (node config); the node config's ``name`` (default: the host's name) names
it in the server's reports. The posterior of a configuration is built once per process
and reused: a client's EM-TDAMP state is wholly the global posterior it receives.
"""

from __future__ import annotations

import json
import socket

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from bnnzoo.catalog import get_entry
from bnnzoo.data import load_dataset
from bnnzoo.errors import BnnzooError

from .client import TDAMPClient
from .fedavg import AdamClient
from .partition import partition as make_partition
from .settings import RUN_CONFIG, FederatedError
from .standardize import moments

STATISTICS = "query.statistics"
_POSTERIORS: dict = {}  # (posterior config JSON, device) -> posterior, per process
_DATASETS: dict = {}  # (name, split) -> Dataset, per process (deployed clients)


def _posterior(config_json: str, device: str):
    key = (config_json, device)
    if key not in _POSTERIORS:
        if len(_POSTERIORS) >= 2:
            _POSTERIORS.pop(next(iter(_POSTERIORS)))
        _POSTERIORS[key] = get_entry("em-tdamp").create(json.loads(config_json), device=device)
    return _POSTERIORS[key]


def _run_setting(context: Context, key: str):
    return context.run_config.get(key, RUN_CONFIG[key][1])


def _deployed_data(context: Context):
    """The local data of a deployed client (module docstring): ``(x, y, name)``."""
    node = context.node_config
    own = node.get("dataset")
    name = str(own or _run_setting(context, "dataset"))
    split = int(_run_setting(context, "split"))
    if (name, split) not in _DATASETS:
        _DATASETS[(name, split)] = load_dataset(name, split=split)
    data = _DATASETS[(name, split)]
    label = str(node.get("name") or socket.gethostname())
    if own:
        return data.x_train, data.y_train, label
    index, count = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    if not 0 <= index < count:
        raise FederatedError(f"node config partition-id {index} must lie in [0, num-partitions {count})")
    parts = make_partition(data.y_train, count, str(_run_setting(context, "partition")),
                           seed=int(_run_setting(context, "seed")), alpha=float(_run_setting(context, "alpha")))
    return data.x_train[parts[index]], data.y_train[parts[index]], f"{label}/client-{index}"


def client_app(data=None, parts=None, *, threads: int | None = None, crash: tuple[int, int] | None = None) -> ClientApp:
    """The ``ClientApp`` of a run (module docstring). With ``data`` (a
    :class:`~bnnzoo.data.Dataset`) and ``parts`` (index tensors, one per client), simulated client
    ``partition-id`` holds ``parts[partition-id]`` of the training split and is named "client
    <partition-id>"; without them it reads its data as a deployed client. ``threads`` sets torch's
    threads in each call; ``crash=(client, round)`` makes that client fail when that round's work
    arrives (fault injection: a client lost mid-run)."""
    app = ClientApp()

    def local(context: Context):
        if data is None:
            return _deployed_data(context)
        index = int(context.node_config["partition-id"])
        idx = parts[index]
        return data.x_train[idx], data.y_train[idx], f"client {index}"

    def guarded(work, message: Message, context: Context) -> Message:
        if threads:
            torch.set_num_threads(threads)
        name = "client"
        try:
            x, y, name = local(context)
            return work(x, y, name)
        except (BnnzooError, ValueError, RuntimeError, TypeError, KeyError) as err:
            reason = f"{name}: {type(err).__name__}: {err}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    @app.query("statistics")
    def statistics(message: Message, context: Context) -> Message:
        def work(x, y, name):
            config = message.content["config"]
            arrays = moments(x, y, str(config["task"]))
            return Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"name": name}),
                                       "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=message)
        return guarded(work, message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        def work(x, y, name):
            config = dict(message.content["config"])
            if "round" not in config and "server-round" not in config:
                raise KeyError("the train message's config names no round ('round' or 'server-round')")
            rnd = int(config["round"] if "round" in config else config["server-round"])
            config["round"] = rnd
            index = int(context.node_config.get("partition-id", 0))
            if crash is not None and crash[0] == index and crash[1] == rnd:
                raise RuntimeError(f"lost in round {rnd} (fault injection)")
            device = str(config["device"])
            posterior = _posterior(str(config["posterior"]), device)
            seed = int(config["seed"]) * 1000 + index
            flushing = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)  # as the centralised fit
            try:
                if config["method"] == "em-tdamp":
                    client = TDAMPClient(posterior, x, y, seed=seed)
                    arrays, n, metrics = client.fit(message.content["arrays"].to_numpy_ndarrays(), config)
                else:
                    torch.manual_seed(seed)
                    client = AdamClient(posterior.net.to_torch(), x, y, posterior.task,
                                        posterior.config["train"]["batch_size"], lr=float(config["lr"]), seed=seed,
                                        device=device)
                    if "adam" in context.state:
                        client.load_optimizer_state(context.state["adam"].to_torch_state_dict())
                    arrays, n, metrics = client.fit(message.content["arrays"].to_torch_state_dict(), config)
                    context.state["adam"] = ArrayRecord(client.optimizer_state())
            finally:
                if flushing:  # the setting is global to the process: leave it as found
                    torch.set_flush_denormal(False)
            return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                       "metrics": MetricRecord({"num-examples": n, **metrics})}), reply_to=message)
        return guarded(work, message, context)

    return app


#: the ClientApp of a deployed run (``flower-supernode`` loads it from the app's pyproject.toml)
app = client_app()
