"""README.md's "What is in the box" names every registry entry: a new entry without docs fails here.

Each name must appear in README.md as a whole code span (`name`), not merely as a substring of
other text, so `laser` is not counted as present because `laser_d` is.
"""

import re
from pathlib import Path

import pytest

from finegrain.credit import ADVANTAGES
from finegrain.envs import ENVIRONMENTS
from finegrain.filters import FILTERS
from finegrain.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from finegrain.rewards import REWARDS
from finegrain.sampling import SAMPLERS
from finegrain.tasks import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"
REGISTRIES = (ADVANTAGES, REWARDS, FILTERS, TASKS, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS, ENVIRONMENTS, SAMPLERS)


def code_spans(text: str) -> set[str]:
    """The contents of every single-backtick code span of ``text``.

    >>> sorted(code_spans("use `grpo` or `rloo`, not grpo_x"))
    ['grpo', 'rloo']
    """
    return set(re.findall(r"`([^`\n]+)`", text))


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.family)
def test_every_registry_entry_is_named_in_the_readme(registry):
    spans = code_spans(README.read_text(encoding="utf-8"))
    # other tests register throwaway entries named test_* in the same process
    missing = [name for name in registry.names() if name not in spans and not name.startswith("test_")]
    assert registry.names(), f"the {registry.family} registry is empty"
    assert not missing, (f"README.md does not name these {registry.family} entries in backticks: {missing}; "
                         "add them to the 'What is in the box' table")
