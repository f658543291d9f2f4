"""Posteriors found by stochastic variational inference with a guide over the weights."""

from __future__ import annotations

from .catalog import Option
from .data.augment import augmentation
from .errors import ConfigError
from .guides import LocalReparamELBO
from .guides.training import LR_SCHEDULES, fit_svi
from .posterior import GuidePosterior

#: the ``lr_schedule`` option of the SVI entries (:func:`~bnnzoo.guides.training.fit_svi`)
LR_SCHEDULE_OPTION = Option(str, choices=LR_SCHEDULES,
                            help="constant, the learning rate throughout; cosine, annealed epoch by epoch along half "
                                 "a cosine from lr to nearly 0 in the last epoch")


def check_lr_schedule(config: dict) -> None:
    """A cosine ``lr_schedule`` spans the fit's epochs, so a fit whose epochs are chosen on held-out
    rows (``select_epochs`` with a ``validation_fraction``, on one part or on ``select_folds``), which
    would end the chosen fit at another place of the cosine than the selection scored, is refused."""
    train = config["train"]
    if train.get("lr_schedule", "constant") == "constant":
        return
    if train.get("validation_fraction") and train.get("select_epochs", True):
        raise ConfigError(f"lr_schedule={train['lr_schedule']!r} anneals over the fit's epochs, so it cannot run "
                          f"with the epochs chosen on validation data: give select_epochs=false or "
                          f"validation_fraction=null, or lr_schedule='constant'")


class VariationalPosterior(GuidePosterior):
    """A posterior represented by a fitted Pyro guide (``q(w)``), trained with SVI.

    ``guide`` must be a :class:`~bnnzoo.guides.WeightGuide`; training uses ``elbo``
    (:class:`~bnnzoo.guides.LocalReparamELBO` by default) with Adam over minibatches of the
    ``train`` section of the config (``epochs``, ``batch_size``, ``lr``, ``num_particles``). An
    ELBO with a ``kl_weight`` (:class:`~bnnzoo.guides.TemperedLocalReparamELBO`) fits a tempered
    posterior; the fit records that weight as ``fit_state.temperature``.

    Checkpoints: when :attr:`checkpoint` is set (a :class:`bnnzoo.checkpoint.Checkpointer`, as
    ``bnnzoo.fit(..., run_dir=, resume=)`` does), the SVI loop writes checkpoints through it and
    resumes from the one it was given (model, guide, Adam, history, fit state, RNG states).
    """

    #: this posterior's fit can write and resume checkpoints (:mod:`bnnzoo.checkpoint`)
    supports_checkpoints = True

    def __init__(self, model, guide, *, name: str, config: dict, device="cpu", elbo=None):
        super().__init__(model, guide, name=name, config=config, device=device)
        self.elbo = elbo
        #: the :class:`~bnnzoo.guides.training.Checkpoint` the next fit writes to and resumes from
        self.checkpoint = None

    @property
    def training_temperature(self) -> float:
        return float(getattr(self.elbo, "kl_weight", 1.0))

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        train = self.config["train"]
        elbo = self.elbo or LocalReparamELBO(num_particles=train.get("num_particles", 1))
        run = fit_svi(
            self.model, self.guide, x, y, elbo=elbo, epochs=self.fit_epochs, batch_size=self.fit_batch_size,
            lr=train["lr"], progress=progress, description=self.name, on_epoch_end=callback,
            checkpoint=self.checkpoint, transform=augmentation(train.get("augment")),
            lr_schedule=train.get("lr_schedule", "constant"),
        )
        self.history.extend(run)
