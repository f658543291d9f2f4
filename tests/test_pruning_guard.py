"""No pruning rule empties a hidden layer unless asked: bnnzoo.models.sparsity.protect_layers."""

from __future__ import annotations

import warnings

import pytest
import torch

from bnnzoo.models.sparsity import EmptyLayerWarning, protect_layers


def test_an_emptied_layer_keeps_its_best_group_and_warns_naming_it():
    keep = {"fc1": torch.zeros(5, dtype=torch.bool), "fc2": torch.tensor([True, False, False])}
    score = {"fc1": torch.tensor([0.1, 0.7, 0.3, -2.0, 0.69]), "fc2": torch.tensor([0.0, 5.0, 1.0])}
    with pytest.warns(EmptyLayerWarning, match="'fc1'") as record:
        out = protect_layers(keep, score)
    assert len(record) == 1                                    # fc2 keeps a group: no warning for it
    assert out["fc1"].tolist() == [False, True, False, False, False]
    assert out["fc2"].tolist() == [True, False, False]         # a layer with a kept group is untouched
    assert not keep["fc1"].any()                               # the inputs are not modified


def test_allow_empty_removes_the_layer_without_a_warning():
    keep = {"fc1": torch.zeros(4, dtype=torch.bool)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = protect_layers(keep, {"fc1": torch.arange(4.0)}, allow_empty=True)
    assert not out["fc1"].any()


def test_conv_masks_keep_their_shape():
    keep = {"conv": torch.zeros(2, 3, dtype=torch.bool)}
    score = {"conv": torch.tensor([[0.0, 1.0, 2.0], [9.0, 3.0, 4.0]])}
    with pytest.warns(EmptyLayerWarning):
        out = protect_layers(keep, score)
    assert out["conv"].shape == (2, 3) and out["conv"].sum() == 1 and out["conv"][1, 0]
