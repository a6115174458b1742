"""Length-grouped batching: every example once per epoch, far less padding than random
batches, a new order every epoch, a sorted evaluation order, and the ListOps task's real
dataloaders using it."""

from __future__ import annotations

import random

import plugformer
from plugformer.batching import LengthGroupedSampler, padding_fraction


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_a_training_epoch_visits_every_example_once_in_low_padding_batches() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(30, 120) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, shuffle=True, seed=3, group_batches=10)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert first != second, "the order must change between epochs"
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    grouped, plain = padding_fraction(lengths, batches_of(first, 16)), padding_fraction(lengths, batches_of(shuffled, 16))
    assert grouped < plain / 4, (grouped, plain)
    # Only the split's tail may be a short batch, and it comes last.
    assert all(len(b) == 16 for b in batches_of(first, 16)[:-1])


def test_a_seeded_epoch_repeats_and_set_epoch_selects_it() -> None:
    lengths = list(range(200))
    a = LengthGroupedSampler(lengths, 8, shuffle=True, seed=5)
    b = LengthGroupedSampler(lengths, 8, shuffle=True, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_evaluation_order_is_sorted_longest_first() -> None:
    lengths = [5, 9, 1, 9, 3]
    assert list(LengthGroupedSampler(lengths, 2, shuffle=False)) == [1, 3, 0, 4, 2]


def test_listops_batches_are_grouped_by_length() -> None:
    def train_batches(bucket: bool) -> list:
        cfg = plugformer.compose([
            "experiment=listops_small", "data.train_examples=512", "data.val_examples=64", "data.test_examples=0",
            "data.batch_size=16", f"data.bucket_by_length={bucket}", "logger=none",
        ])
        data = plugformer.build(cfg).data
        return list(data.train_dataloader())

    def padding(batches: list) -> float:
        mask = [b["attention_mask"] for b in batches]
        return 1 - sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask)

    grouped, plain = train_batches(True), train_batches(False)
    assert sum(len(b["labels"]) for b in grouped) == sum(len(b["labels"]) for b in plain) == 512
    assert padding(grouped) < padding(plain) / 3, (padding(grouped), padding(plain))
