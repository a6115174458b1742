"""The MQAR generator follows Zoology: distinct keys and values per example, every answer is
its key's value, queried keys never reappear as filler, power-law gaps, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plugformer import ConfigError, DataContext
from plugformer.data import IGNORE_INDEX
from plugformer_plugins.data.mqar import MQARConfig, MQARTask, check_config, gap_weights, generate

SETTINGS = [
    MQARConfig(),
    MQARConfig(placement="power_law"),
    MQARConfig(vocab_size=20, num_pairs=9, seq_len=37),  # every key used, few filler ids left
    MQARConfig(random_non_queries=False),
]


def split(config: MQARConfig, examples: int = 500, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """inputs, labels, keys and values (the context's pairs) of generated examples."""
    data = generate(config, examples, seed)
    inputs, labels = data["input_ids"], data["labels"]
    context = 2 * config.num_pairs
    return inputs, labels, inputs[:, 0:context:2], inputs[:, 1:context:2]


def distinct_rows(a: np.ndarray) -> bool:
    ordered = np.sort(a, axis=1)
    return bool((ordered[:, 1:] != ordered[:, :-1]).all())


@pytest.mark.parametrize("config", SETTINGS, ids=["default", "power_law", "tight", "zeros"])
def test_pairs_queries_and_filler(config: MQARConfig) -> None:
    inputs, labels, keys, values = split(config)
    half = config.vocab_size // 2
    assert inputs.shape == labels.shape == (500, config.seq_len)
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < config.vocab_size)).all()
    assert distinct_rows(keys), "keys repeat within an example"
    assert distinct_rows(values), "values repeat within an example"
    context = 2 * config.num_pairs
    for row in range(len(inputs)):
        answer = dict(zip(keys[row].tolist(), values[row].tolist()))
        queried = np.flatnonzero(labels[row] != IGNORE_INDEX)
        assert len(queried) == config.num_pairs and (queried >= context).all()
        assert sorted(inputs[row, queried].tolist()) == sorted(answer), "each key is queried exactly once"
        for position in queried:
            assert labels[row, position] == answer[int(inputs[row, position])], "the answer is the key's value"
        filler = np.setdiff1d(np.arange(context, config.seq_len), queried)
        assert not np.isin(inputs[row, filler], keys[row]).any(), "a queried key reappears as filler"
        assert not np.isin(inputs[row, filler], values[row]).any(), "a value reappears as filler"
        if config.random_non_queries:
            assert (inputs[row, filler] >= 1).all()
        else:
            assert (inputs[row, filler] == 0).all()


def test_filler_is_spread_over_the_allowed_ids() -> None:
    inputs, labels, keys, values = split(MQARConfig(), examples=200)
    filler = inputs[:, 16:][labels[:, 16:] == IGNORE_INDEX]
    assert len(np.unique(filler)) > 200  # of 255 ids, 16 excluded per example


def test_deterministic_for_a_seed() -> None:
    a, b, c = (generate(MQARConfig(), 50, seed) for seed in (3, 3, 4))
    assert (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
    assert (a["input_ids"] != c["input_ids"]).any()


def test_power_law_gaps_are_shorter_than_uniform() -> None:
    def mean_gap(placement: str) -> float:
        _, labels, _, _ = split(MQARConfig(placement=placement), examples=2000)
        return float(np.argwhere(labels != IGNORE_INDEX)[:, 1].mean()) - 16

    uniform, power_law = mean_gap("uniform"), mean_gap("power_law")
    assert power_law < uniform - 5, (power_law, uniform)
    weights = gap_weights(24, "power_law", 0.01)
    assert weights[0] > weights[1] > weights[-1] and abs(weights.sum() - 1) < 1e-12
    assert np.allclose(gap_weights(24, "power_law", 1.0), gap_weights(24, "uniform", 0.01))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"vocab_size": 16, "num_pairs": 8}, "distinct keys"),
        ({"seq_len": 31, "num_pairs": 8}, "seq_len ≥ 4·num_pairs"),
        ({"vocab_size": 8, "num_pairs": 4, "seq_len": 16}, "num_pairs ≤ vocab_size/2 − 1"),
    ],
)
def test_refuses_sizes_that_cannot_hold_the_pairs(overrides: dict, expected: str, tmp_path: Path) -> None:
    config = MQARConfig(**overrides)
    with pytest.raises(ConfigError) as error:
        check_config(config)
    message = error.value.message()
    assert expected in message and "Expected:" in message and "Fix:" in message
    with pytest.raises(ConfigError):
        MQARTask(config, DataContext(cache_dir=tmp_path))
    with pytest.raises(ConfigError):
        generate(config, 4, 0)


def test_the_smallest_sizes_that_fit_are_accepted() -> None:
    check_config(MQARConfig(vocab_size=18, num_pairs=8, seq_len=32))
    inputs, labels, keys, values = split(MQARConfig(vocab_size=18, num_pairs=8, seq_len=32), examples=20)
    assert distinct_rows(keys) and distinct_rows(values)
