"""Fixtures shared by the eval tests: the arith task and a character tokenizer for it."""

import pytest

from finegrain.models.tokenizer import char_tokenizer
from finegrain.tasks import TASKS


@pytest.fixture(scope="module")
def task():
    return TASKS.get("arith")()


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(sorted(set("0123456789+-*=QA: \n")))
