"""The distorted-MNIST models: shapes, transformers, matched parameter counts, pooling, errors."""

import pytest
import torch
from torch import nn

from triptych.spatial import (
    INPUT_SIZES,
    MODEL_NAMES,
    SpatialTransformer,
    build_model,
    count_parameters,
    parameter_table,
)


@pytest.mark.parametrize("input_size", INPUT_SIZES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits(name, input_size):
    model = build_model(name, input_size)
    logits = model(torch.rand(3, 1, input_size, input_size))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    if name in ("FCN", "CNN"):
        assert model.transformer is None
    else:
        assert isinstance(model.transformer, SpatialTransformer)
        expected = {"Aff": "affine", "Proj": "projective", "TPS": "tps"}[name.split()[-1]]
        assert model.transformer.transform == expected
        family = name.split()[0][3:]
        localisation_layers = (nn.Conv2d if family == "CNN" else nn.Linear)
        assert any(isinstance(m, localisation_layers) for m in model.transformer.localization)


def test_parameter_counts_are_matched_within_each_family():
    table = parameter_table()
    for size in INPUT_SIZES:
        for name in MODEL_NAMES[2:]:
            reference = table["CNN" if "CNN" in name else "FCN"][size]
            assert abs(table[name][size] - reference) <= 0.10 * reference, (name, size, table[name][size], reference)
            assert abs(table[name][size] - reference) <= 0.02 * reference  # what the width solver achieves
    assert table["FCN"][28] != table["CNN"][28]  # families are not forced together


def test_count_parameters_counts_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 4 + 4 * 2 + 2
    with pytest.raises(ValueError, match="is not initialised yet; run one forward pass before counting"):
        count_parameters(nn.LazyLinear(3))


@pytest.mark.parametrize("input_size", INPUT_SIZES)
def test_st_models_at_initialisation_equal_their_classifier_on_the_input(input_size):
    model = build_model("ST-CNN Aff", input_size)
    x = torch.rand(2, 1, input_size, input_size)
    pooled = input_size in (42, 60)
    assert model.pool == pooled
    expected_input = nn.functional.avg_pool2d(x, 2) if pooled else x
    torch.testing.assert_close(model(x), model.classifier(expected_input), rtol=1e-5, atol=1e-5)


def test_inputs_reach_the_transformer_unnormalised():
    model = build_model("ST-FCN Aff", 28)
    seen = []
    model.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(2, 1, 28, 28)
    model(x)
    assert seen[0] is x


def test_lower_learning_rate_for_the_localisation_network_is_possible():
    model = build_model("ST-CNN TPS", 28)
    transformer_ids = {id(p) for p in model.transformer.parameters()}
    rest = [p for p in model.parameters() if id(p) not in transformer_ids]
    optimizer = torch.optim.SGD([{"params": rest}, {"params": model.transformer.parameters(), "lr": 0.001}], lr=0.01)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(model)


def test_models_train_a_step():
    model = build_model("ST-CNN Proj", 42)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 42, 42), torch.randint(0, 10, (8,))
    before = model.transformer.regression.weight.clone()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(model.transformer.regression.weight, before)


def test_build_model_errors():
    with pytest.raises(ValueError, match="name must be one of 'FCN', 'CNN'"):
        build_model("ST-RNN Aff", 28)
    with pytest.raises(ValueError, match="input_size must be one of 28, 42, 60; got 32"):
        build_model("CNN", 32)
    with pytest.raises(ValueError, match=r"x must have shape \*x1x42x42, got \(2, 1, 28, 28\)"):
        build_model("ST-FCN TPS", 42)(torch.rand(2, 1, 28, 28))
    assert build_model("CNN", 28, n_classes=19)(torch.rand(1, 1, 28, 28)).shape == (1, 19)
