"""Credit assignment: advantage estimators, registered by name in ``ADVANTAGES``.

Every entry has one signature::

    fn(token_rewards (B, L), loss_mask (B, L) bool, group_ids (B,) long, step_ids (B, L) long,
       *, **hyperparameters) -> advantages (B, L)

and is registered with ``consumes=`` the finest reward level it understands ('outcome', 'step'
or 'token'); the trainer refuses to feed it finer rewards.
"""

from finegrain.registry import Registry

ADVANTAGES = Registry("advantage estimator")

from finegrain.credit import outcome, prime  # noqa: E402,F401  (registers entries)
from finegrain.credit import turns  # noqa: E402,F401  (registers entries)
from finegrain.credit import prl, spae  # noqa: E402,F401  (registers entries)
from finegrain.credit import gae  # noqa: E402,F401  (registers entries; needs_values=True)
from finegrain.credit import p2s  # noqa: E402,F401  (registers entries)
from finegrain.credit import pairwise  # noqa: E402,F401  (registers passthrough; Think-RM pairwise maths)
