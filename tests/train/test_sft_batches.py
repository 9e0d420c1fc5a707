"""SFT batch order: plain shuffles, and length-grouped batches (``sft.group_by_length``)."""

import random

from finegrain.train.sft import batch_order


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)


def test_every_row_once_and_plain_order_is_the_seeded_shuffle():
    lengths = [random.Random(1).randrange(10, 300) for _ in range(1000)]
    for grouped in (False, True):
        batches = batch_order(lengths, 32, random.Random(0), grouped)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(1 <= len(b) <= 32 for b in batches)
    order = list(range(1000))
    random.Random(0).shuffle(order)
    assert [i for b in batch_order(lengths, 32, random.Random(0)) for i in b] == order  # unchanged default


def test_grouped_batches_pad_less_and_stay_in_random_order():
    rng = random.Random(2)
    lengths = [rng.choice([60, 120, 240, 370]) + rng.randrange(10) for _ in range(3868)]
    plain = batch_order(lengths, 32, random.Random(0))
    grouped = batch_order(lengths, 32, random.Random(0), True)
    assert _padding(lengths, grouped) < 1.05 < 1.3 < _padding(lengths, plain)
    firsts = [max(lengths[i] for i in b) for b in grouped[:20]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not longest-first overall
