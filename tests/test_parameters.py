"""Initialization and weight decay of plugin parameters, and the opt-outs a component has:
plugformer.keep_initialization and plugformer.set_weight_decay."""

from __future__ import annotations

import torch
from torch import nn

from plugformer import keep_initialization, mark_residual_projection, set_weight_decay
from plugformer.model.transformer import initialize
from plugformer.training.optim import parameter_groups


class Mixer(nn.Module):
    """A plugin sublayer: an identity-initialized mixing layer, a raw parameter matrix, a gain."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(width))
            self.mix.bias.fill_(0.5)
        self.table = nn.Parameter(torch.eye(width))
        self.gain = nn.Parameter(torch.ones(width))
        self.plain = nn.Linear(width, width)


def group_of(groups: list[dict], parameter: nn.Parameter) -> float:
    (decay,) = [g["weight_decay"] for g in groups if any(p is parameter for p in g["params"])]
    return decay


def test_defaults_gpt2_init_for_linear_layers_raw_parameters_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Mixer(), mark_residual_projection(nn.Linear(4, 4)))
    initialize(model, n_layers=2)
    mixer = model[0]
    assert not torch.equal(mixer.mix.weight, torch.eye(4))  # overwritten with N(0, 0.02)
    assert float(mixer.mix.weight.detach().std()) < 0.1 and not mixer.mix.bias.any()
    assert torch.equal(mixer.table, torch.eye(4))  # raw parameters are the component's own
    groups = parameter_groups(model, 0.1)
    assert group_of(groups, mixer.mix.weight) == 0.1 and group_of(groups, mixer.table) == 0.1
    assert group_of(groups, mixer.mix.bias) == 0.0 and group_of(groups, mixer.gain) == 0.0


def test_keep_initialization_leaves_a_module_and_its_children_as_built() -> None:
    torch.manual_seed(0)
    kept, other = keep_initialization(Mixer()), Mixer()
    model = nn.ModuleDict({"kept": kept, "other": other})
    plain_before = kept.plain.weight.clone()
    initialize(model, n_layers=2)
    assert torch.equal(kept.mix.weight, torch.eye(4)) and bool((kept.mix.bias == 0.5).all())
    assert torch.equal(kept.plain.weight, plain_before)  # nn.Linear's own init, not GPT-2's
    assert not torch.equal(other.mix.weight, torch.eye(4))  # only the marked module opts out


def test_init_weights_still_has_the_last_word_in_a_kept_module() -> None:
    class Custom(Mixer):
        def init_weights(self) -> None:
            nn.init.constant_(self.gain, 3.0)

    module = keep_initialization(Custom())
    initialize(nn.Sequential(module), n_layers=1)
    assert bool((module.gain == 3.0).all()) and torch.equal(module.mix.weight, torch.eye(4))


def test_set_weight_decay_overrides_the_shape_rule_both_ways() -> None:
    mixer = Mixer()
    set_weight_decay(mixer.table, False)  # an identity mixing matrix: decay would pull it to zero
    set_weight_decay(mixer.gain, True)
    groups = parameter_groups(mixer, 0.1)
    assert group_of(groups, mixer.table) == 0.0 and group_of(groups, mixer.gain) == 0.1
    assert group_of(groups, mixer.mix.weight) == 0.1 and group_of(groups, mixer.mix.bias) == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(mixer.parameters()))


def test_the_choice_survives_a_state_dict_round_trip_of_the_model() -> None:
    # The mark lives on the Parameter object a factory creates; loading weights keeps it.
    mixer = Mixer()
    set_weight_decay(mixer.table, False)
    mixer.load_state_dict(Mixer().state_dict())
    assert group_of(parameter_groups(mixer, 0.1), mixer.table) == 0.0
