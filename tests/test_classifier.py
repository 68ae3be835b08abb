"""The shipped feature networks: they load, and reach the accuracy their metadata records."""

import pytest
import torch

from mlatlas.data import DatasetError, load_dataset
from mlatlas.eval.classifier import (
    FEATURE_DIM,
    accuracy,
    classifier_info,
    image_features,
    load_feature_net,
    train_classifier,
)


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion-mnist"])
def test_shipped_weights_reach_their_recorded_accuracy(name):
    try:
        data = load_dataset(name)
    except DatasetError as err:
        pytest.skip(str(err))
    net, info = load_feature_net(name), classifier_info(name)
    assert accuracy(net, data.x_test, data.y_test) == pytest.approx(
        float(info["test_accuracy"]), abs=1e-6)
    assert float(info["test_accuracy"]) > {"digits": 0.95, "mnist": 0.93,
                                           "fashion-mnist": 0.8}[name]
    assert load_feature_net(f"{name}-binary") is not None


def test_features_shape_and_missing_weights():
    net = load_feature_net("digits")
    assert image_features(net, torch.rand(5, 1, 8, 8)).shape == (5, FEATURE_DIM)
    with pytest.raises(FileNotFoundError, match="no feature network ships for 'cifar'"):
        load_feature_net("cifar")


def test_training_learns():
    net, stats = train_classifier(load_dataset("digits"), steps=150, progress=False)
    assert stats["test_accuracy"] > 0.8  # chance is 0.1
