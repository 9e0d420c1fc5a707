"""Policy losses (per-token), their reduction to a scalar, KL estimators and PRM losses.

Registries:
    POLICY_LOSSES: fn(logprobs, old_logprobs, advantages, loss_mask, *, **hp) -> (per_token_loss (B, L), metrics)
    AGGREGATIONS:  fn(per_token_loss (B, L), loss_mask (B, L), *, **hp) -> scalar
    KL_ESTIMATORS: fn(logprobs (B, L), ref_logprobs (B, L)) -> per-token KL estimate (B, L)
"""

from finegrain.registry import Registry

POLICY_LOSSES = Registry("policy loss")
AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")

from finegrain.losses import aggregate, kl, policy  # noqa: E402,F401  (registers entries)
from finegrain.losses import value  # noqa: E402,F401  (the critic's clipped value loss)
