"""BMR-RHS (rule ``"rhs"`` of ``bnnzoo.guides.bmr.reduce``): the regularised-horseshoe dF against the
exact evidence of a conjugate model, the hyperprior against torch's densities, the fit against a
brute-force grid, the pruning decision on synthetic posteriors, the empty-layer guard, bad options,
and the ``bmr`` entry's option through save and load."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_model, randomise_guide

import bnnzoo
from bnnzoo.guides import MeanFieldNormal, bmr, bmr_rhs
from bnnzoo.guides.sites import get_site
from bnnzoo.models.networks import mlp
from bnnzoo.models.sparsity import EmptyLayerWarning

F64 = torch.float64


def _log_evidence(x, y, noise_var, prior_var):
    """``ln N(y; 0, X diag(prior_var) X' + noise I)``: the exact evidence of ``y = X w + e``."""
    cov = x @ torch.diag(prior_var) @ x.T + noise_var * torch.eye(len(y), dtype=F64)
    return torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=F64), cov).log_prob(y)


def test_rhs_delta_f_is_the_exact_evidence_change():
    """Orthogonal design: the exact posterior factorises, so the summed per-weight dF of the
    regularised-horseshoe priors equals the exact log evidence ratio (a local scale of 0 included)."""
    gen = torch.Generator().manual_seed(0)
    n, d, s2, noise = 30, 5, 2.0, 0.25
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=F64))
    x = q * torch.linspace(1.0, 4.0, d, dtype=F64)
    y = x @ torch.tensor([1.5, 0.0, -0.8, 0.0, 0.05], dtype=F64) + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    prec = x.T @ x / noise + torch.eye(d, dtype=F64) / s2
    cov = torch.linalg.inv(prec)
    mu = cov @ x.T @ y / noise
    var = torch.diagonal(cov)
    assert torch.allclose(cov, torch.diag(var), atol=1e-12)
    tau, c2 = torch.tensor(0.7, dtype=F64), torch.tensor(3.0, dtype=F64)
    local = torch.tensor([2.0, 0.0, 0.5, 0.1, 5.0], dtype=F64)
    g2 = bmr_rhs.rhs_variance_ratio(tau, c2, local)
    torch.testing.assert_close(g2, c2 * (tau * local) ** 2 / (c2 + (tau * local) ** 2))
    d_f = bmr_rhs.rhs_delta_f(mu, var, s2, tau, c2, local)
    exact = _log_evidence(x, y, noise, s2 * g2) - _log_evidence(x, y, noise, torch.full((d,), s2, dtype=F64))
    torch.testing.assert_close(d_f.sum(), exact, rtol=1e-9, atol=1e-9)
    # and weight by weight it is the dF of bnnzoo.guides.bmr at r^2 = s^2 g^2
    torch.testing.assert_close(d_f, bmr.delta_f(mu, var, s2, s2 * g2))
    # a posterior not narrower than its prior carries no evidence
    assert float(bmr_rhs.rhs_delta_f(torch.tensor([0.3], dtype=F64), 2.5, s2, tau, c2, local[:1])) == 0.0


def test_log_hyperprior_is_the_half_cauchy_and_inverse_gamma_density():
    tau, c2 = torch.tensor(0.03, dtype=F64), torch.tensor(1.7, dtype=F64)
    local = torch.tensor([0.0, 0.4, 3.0], dtype=F64)
    hc = torch.distributions.HalfCauchy
    inv_gamma = torch.distributions.TransformedDistribution(
        torch.distributions.Gamma(torch.tensor(2.0, dtype=F64), torch.tensor(6.0, dtype=F64)),
        torch.distributions.PowerTransform(torch.tensor(-1.0, dtype=F64)))
    expected = (hc(torch.tensor(0.01, dtype=F64)).log_prob(tau) + inv_gamma.log_prob(c2)
                + hc(torch.tensor(1.0, dtype=F64)).log_prob(local).sum())
    torch.testing.assert_close(bmr_rhs.log_hyperprior(tau, c2, local, tau0=0.01), expected)


def _log_half_cauchy(x, scale):
    return math.log(2 / (math.pi * scale)) - torch.log1p((x / scale) ** 2)


def test_the_fit_reaches_the_maximiser_of_a_brute_force_grid():
    """Two groups of two weights (one supported, one not): the fitted J is at least the best of a
    4-D grid over (tau, c^2, lambda_1, lambda_2) with lambda = 0 on it, it is a local maximum, and the
    unsupported group sits at the boundary lambda = 0 as on the grid."""
    mu = torch.tensor([[0.9, -0.6], [0.05, 0.0]], dtype=F64)
    var = torch.tensor([[0.04, 0.05], [0.3, 0.4]], dtype=F64)
    fit = bmr_rhs.fit_rhs(mu, var, 1.0, per_group=True, num_steps=2000)
    assert fit.prune[1].all() and not fit.prune[0].any()

    def j(tau, c2, l1, l2):
        """J by its definition (module docstring of bnnzoo.guides.bmr_rhs), broadcasting."""
        tau, c2, l1, l2 = torch.broadcast_tensors(tau, c2, l1, l2)
        local = torch.stack([l1, l2], -1)[..., None]  # (..., 2 groups, 1)
        d_f = bmr_rhs.rhs_delta_f(mu, var, 1.0, tau[..., None, None], c2[..., None, None], local).sum((-1, -2))
        log_inv_gamma = 2 * math.log(6.0) - math.lgamma(2.0) - 3 * torch.log(c2) - 6 / c2
        return (d_f + _log_half_cauchy(tau, bmr_rhs.TAU0) + log_inv_gamma + _log_half_cauchy(l1, 1.0)
                + _log_half_cauchy(l2, 1.0))

    locals_ = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-3, 3, 40, dtype=F64)])
    taus, c2s = torch.logspace(-3, 3, 37, dtype=F64), torch.logspace(-1.5, 1.5, 19, dtype=F64)
    grid = j(taus[:, None, None, None], c2s[None, :, None, None], locals_[None, None, :, None],
             locals_[None, None, None, :])
    _, _, i_1, i_2 = torch.unravel_index(grid.argmax(), grid.shape)
    assert float(locals_[i_2]) == 0.0 and float(locals_[i_1]) > 0  # the grid prunes group 2 too
    at_fit = j(fit.tau, fit.slab_var, fit.local[0, 0], fit.local[1, 0])
    torch.testing.assert_close(at_fit, fit.objective)
    assert float(at_fit) >= float(grid.max()) - 1e-9
    assert float(at_fit) - float(grid.max()) < 0.1  # the grid's best is close below
    for delta in (1.05, 1 / 1.05):  # a local maximum in every interior coordinate
        assert float(j(fit.tau * delta, fit.slab_var, fit.local[0, 0], fit.local[1, 0])) < float(at_fit)
        assert float(j(fit.tau, fit.slab_var * delta, fit.local[0, 0], fit.local[1, 0])) < float(at_fit)
        assert float(j(fit.tau, fit.slab_var, fit.local[0, 0] * delta, fit.local[1, 0])) < float(at_fit)
    assert float(j(fit.tau, fit.slab_var, fit.local[0, 0], torch.tensor(1e-3, dtype=F64))) < float(at_fit)


def _layer_guide(seed=0):
    """fc1 (4 -> 6): rows 0-2 with strong evidence, rows 3-5 without (means 0, wide posteriors)."""
    model = make_model(mlp(4, [6], 1), prior_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), loc_scale=0.0, log_scale_range=(-0.6, -0.5), seed=seed)
    with torch.no_grad():
        get_site(guide.locs, "fc1.weight")[:3] = torch.tensor([1.5, -1.2, 2.0, 0.9])
        get_site(guide.log_scales, "fc1.weight")[:3] = math.log(0.05)
    return guide


@pytest.mark.parametrize("level", ["weight", "group"])
def test_unsupported_weights_are_pruned_and_supported_ones_kept(level):
    guide = _layer_guide()
    reduced = copy.deepcopy(guide)
    reduction = bmr.reduce(reduced, rule="rhs", level=level)
    keep = reduced.mask("fc1.weight")
    assert keep[:3].all() and not keep[3:].any()
    assert reduced.mask("fc2.weight") is None  # the output layer is left alone
    assert (get_site(reduced.locs, "fc1.weight")[3:] == 0).all()
    fit = reduction.rhs["fc1"]
    assert fit.local.shape == ((6, 1) if level == "group" else (1, 30))
    summary = reduction.summary()["layers"]["fc1"]
    assert summary["threshold"] is None and summary["rhs"]["tau"] == pytest.approx(float(fit.tau))
    assert summary["rhs"]["locals_at_zero"] == int((fit.local == 0).sum()) > 0
    json.dumps(reduction.summary())
    # the rows pruned are those without support (each weight's Savage-Dickey dF > 0)
    d_f = bmr.evidence_changes(guide)["fc1.weight"]
    assert (d_f[3:] > 0).all() and (d_f[:3] < 0).all()


def test_weights_pruned_before_stay_pruned_and_leave_the_fit_alone():
    mu = torch.tensor([[1.0, -0.8, 0.7], [0.02, 0.01, 0.5]], dtype=F64)
    var = torch.tensor([[0.02, 0.03, 0.01], [0.5, 0.6, 0.3]], dtype=F64)
    live = torch.tensor([[True, True, True], [True, True, False]])
    with_dead = bmr_rhs.fit_rhs(mu, var, 1.0, live, per_group=True)
    without = bmr_rhs.fit_rhs(torch.cat([mu[:, :2], torch.tensor([[0.7], [0.0]], dtype=F64)], 1),
                              torch.cat([var[:, :2], torch.tensor([[0.01], [1.0]], dtype=F64)], 1), 1.0,
                              per_group=True)  # a posterior equal to its prior carries no evidence
    torch.testing.assert_close(with_dead.tau, without.tau)
    torch.testing.assert_close(with_dead.local, without.local)
    guide = _layer_guide()
    bmr.reduce(guide, rule="plain")
    before = guide.mask("fc1.weight").clone()
    assert not before.all()
    bmr.reduce(guide, rule="rhs")
    assert not (guide.mask("fc1.weight") & ~before).any()


def test_a_rhs_reduction_never_empties_a_layer():
    guide = _layer_guide()
    with torch.no_grad():  # no row has support now
        get_site(guide.locs, "fc1.weight").fill_(0.0)
        get_site(guide.locs, "fc1.weight")[4, 0] = 0.2
        get_site(guide.log_scales, "fc1.weight").fill_(math.log(0.6))
    empty = copy.deepcopy(guide)
    bmr.reduce(empty, rule="rhs", level="group", allow_empty=True)
    assert not empty.mask("fc1.weight").any()
    with pytest.warns(EmptyLayerWarning, match="fc1"):
        reduction = bmr.reduce(guide, rule="rhs", level="group")
    rows = guide.mask("fc1.weight").any(1)
    assert int(rows.sum()) == 1 and reduction.protected == ["fc1"]


def test_bad_options_are_refused(boston):
    guide = _layer_guide()
    with pytest.raises(ValueError, match="reduced_var must be 0"):
        bmr.reduce(copy.deepcopy(guide), rule="rhs", reduced_var=0.1)
    with pytest.raises(ValueError, match="rhs_tau0"):
        bmr.reduce(copy.deepcopy(guide), rule="rhs", rhs_tau0=0.0)
    with pytest.raises(ValueError, match="prune_decision"):
        bmr.prune_decision(torch.zeros(3), rule="rhs")
    with pytest.raises(ValueError, match="unknown BMR rule"):
        bmr.reduce(copy.deepcopy(guide), rule="horseshoe")
    with pytest.raises(ValueError, match="matrix"):
        bmr_rhs.fit_rhs(torch.zeros(3), torch.ones(3), 1.0)
    with pytest.raises(bnnzoo.errors.ConfigError, match="rhs_tau0"):
        bnnzoo.fit("bmr", boston, epochs=1, rule="rhs", rhs_tau0=-1.0, progress=False)
    with pytest.raises(bnnzoo.errors.ConfigError, match="rule"):
        bnnzoo.fit("bmr", boston, epochs=1, rule="rhs-group", progress=False)


def test_bmr_entry_with_rule_rhs_records_saves_and_loads(boston, tmp_path):
    posterior = bnnzoo.fit("bmr", boston, epochs=3, rule="rhs", level="group", rhs_tau0=0.05, progress=False)
    record = posterior.fit_state.pruning[0]
    assert record.rule == "bmr" and record.options["rule"] == "rhs" and record.options["rhs_tau0"] == 0.05
    layer = record.summary["layers"]["fc1"]
    assert layer["threshold"] is None and set(layer["rhs"]) >= {"tau", "slab_scale", "locals_at_zero"}
    assert layer["rhs"]["locals"] == 50  # one local scale per neuron of the 50-unit hidden layer
    posterior.save(tmp_path / "run")
    same = bnnzoo.load(tmp_path / "run")
    assert same.fit_state.pruning[0].summary == record.summary
    assert torch.equal(same.masks()["fc1.weight"], posterior.masks()["fc1.weight"])
    torch.manual_seed(0)
    a = posterior.evaluate(boston.x_test, boston.y_test, num_samples=10)
    torch.manual_seed(0)
    assert same.evaluate(boston.x_test, boston.y_test, num_samples=10) == pytest.approx(a)
    # the S&S default records no rhs_tau0
    assert "rhs_tau0" not in bnnzoo.fit("bmr", boston, epochs=1, progress=False).fit_state.pruning[0].options


def test_posterior_reduce_takes_rule_rhs(fitted_meanfield, boston):
    reduced = fitted_meanfield.reduce(rule="rhs", rhs_tau0=0.1)
    record = reduced.fit_state.pruning[-1]
    assert record.options == {"rule": "rhs", "rhs_tau0": 0.1}
    fit = record.summary["layers"]["fc1"]["rhs"]
    assert fit["locals"] == 700 and reduced.sparsity()["weights_pruned_fraction"] > 0
    assert fitted_meanfield.masks() == {} or all(m.all() for m in fitted_meanfield.masks().values())
    assert reduced.evaluate(boston.x_test, boston.y_test, num_samples=5)["rmse"] < 15
