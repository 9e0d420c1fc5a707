"""The implicit PRM as used online by PRIME: scored and updated on every RL batch.

The PRM π_φ starts as a copy of the starting policy (PRIME initialises it from the SFT model);
π_ref is a frozen copy of the starting policy (``ref: initial``) or the rollout policy's own
log-probs (``ref: policy``). Labels are the task verifier's outcomes (0/1), so the PRM learns
from outcome labels only. Every setting is a keyword of ``rewards[i].kwargs`` (one place, with its
default in ``from_context``):

    rewards:
    - name: implicit_prm
      kwargs: {beta: 0.05, update: after, loss: ce, lr: 1.0e-4, grad_clip: 10.0, ref: initial}

Update modes (``update``):
    after   score with a forward that keeps its graph, then take one PRM step with the same
            forward (PRIME's default; one PRM forward per RL step)
    before  take the PRM step first, then score with the updated PRM (a second forward); the
            reference repo's 'before' crashes, verl's recipe implements it this way
    none    score only (a frozen PRM)

Evaluation (``finegrain eval``, best-of-N, step search) builds this same entry from a context
whose ``policy`` is the PRM and whose ``initial_policy()`` is its reference, with the registry's
``eval_kwargs``: ``update: none``, ``copy_policy: false`` (score with that model as it is, no
deep copy of a possibly large PRM), ``temperature: 1.0``.

Departures: (1) one PRM optimizer step per RL step on the whole batch (PRIME splits it into
mini-batches); (2) the PRM's own AdamW with constant LR and gradient clipping ``grad_clip``;
(3) default lr 1e-4, not PRIME's 1e-6: PRIME's is for 7B models, and a tiny model's PRM at 1e-6
barely moves in a demo's 100 steps (set ``lr`` for a real model).
"""

from __future__ import annotations

import copy

import torch

from finegrain.credit.prime import prime_batch_norm
from finegrain.losses.prm import implicit_prm_ce_loss, implicit_prm_dpo_loss
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.rewards.implicit_prm import ImplicitPRM, implicit_step_rewards
from finegrain.models.load import load_weights_into
from finegrain.models.lora import is_lora, merged_copy
from finegrain.guards import check_finite, clip_and_step


# ``level`` in kwargs overrides the registry level. In ``finegrain eval`` the PRM is a fixed model:
# ``eval_needs="prm"`` makes the command load ``--prm`` as ``ctx.policy`` and ``--prm-ref`` as
# ``ctx.initial_policy()``, and ``eval_kwargs`` score with it as it is (no update, no copy) at
# temperature 1, the models' own distributions.
@REWARDS.register("implicit_prm", level="token", needs="verify", levels=("token", "step"), trainable=True,
                  bounds={"micro_batch": "[1, inf)", "beta": "(0, inf)", "lr": "(0, inf)", "grad_clip": "[0, inf)",
                          "temperature": "(0, inf)"},
                  choices={"level": ("token", "step"), "granularity": ("token", "whole"), "norm": ("none", "batch_norm"),
                           "update": ("after", "before", "none"), "loss": ("ce", "dpo"), "ref": ("initial", "policy")},
                  vote="sigmoid", center=0.0, search_value="sum", eval_needs="prm",
                  eval_kwargs={"update": "none", "copy_policy": False, "temperature": 1.0, "micro_batch": 64})
class OnlineImplicitPRM(ImplicitPRM):
    """ImplicitPRM plus its own optimizer and online update.

    Keyword args (``rewards[i].kwargs``, defaults in ``from_context``): level, granularity,
    micro_batch — see ImplicitPRM — ``norm``: 'none' | 'batch_norm' (PRIME's prime_norm: divide
    token rewards by the largest |return-to-go| in the batch), β, the update mode, the loss, the
    PRM's learning rate and gradient clip, and π_ref ('initial' | 'policy'). ``temperature``
    divides the PRM and reference logits (None = ``rollout.temperature``, which ``ref: policy``
    needs). ``copy_policy=False`` scores with ``ctx.policy`` itself instead of a deep copy: only
    with ``update='none'`` (an update would train that model), for a PRM that is already a
    separate, fixed model (``finegrain eval`` loads it as ``ctx.policy``); the signal then builds
    no optimizer and leaves the model's train/eval mode as the caller set it.
    """

    def __init__(self, prm_model, ref_model, *, task, beta: float, level: str, granularity: str,
                 micro_batch: int | None, temperature: float, update: str, loss: str, lr: float, grad_clip: float,
                 norm: str, owns_model: bool = True):
        super().__init__(prm_model, ref_model, beta=beta, level=level, granularity=granularity,
                         micro_batch=micro_batch, temperature=temperature)
        if update not in ("after", "before", "none"):
            raise ValueError(f"implicit_prm.update: expected after | before | none, got '{update}'")
        if loss not in ("ce", "dpo"):
            raise ValueError(f"implicit_prm.loss: expected ce | dpo, got '{loss}'")
        if norm not in ("none", "batch_norm"):
            raise ValueError(f"implicit_prm.norm: expected none | batch_norm, got '{norm}'")
        if not owns_model and update != "none":
            raise ValueError("implicit_prm.copy_policy: false scores with the policy itself, so it needs update: none "
                             f"(update '{update}' would train that model)")
        self.task, self.update_mode, self.loss_name, self.grad_clip, self.norm = task, update, loss, grad_clip, norm
        self.owns_model = owns_model
        # a shared model is never updated here: no optimizer over another component's parameters
        self.optimizer = torch.optim.AdamW(prm_model.parameters(), lr=lr, weight_decay=0.0) if owns_model else None
        self._pending = None

    @classmethod
    def from_context(cls, ctx, *, level: str = "token", granularity: str = "token", micro_batch: int | None = None,
                     norm: str = "none", beta: float = 0.05, update: str = "after", loss: str = "ce", lr: float = 1e-4,
                     grad_clip: float = 10.0, ref: str = "initial", temperature: float | None = None,
                     copy_policy: bool = True):
        if copy_policy:
            # a LoRA policy's PRM is a plain full-weight model with the merged weights (it trains
            # every weight and checkpoints as a full model, not as adapters)
            prm = merged_copy(ctx.policy) if is_lora(ctx.policy) else copy.deepcopy(ctx.policy)
            for p in prm.parameters():
                p.requires_grad_(True)
        else:
            prm = ctx.policy
        ref_model = ctx.initial_policy() if ref == "initial" else None
        if ref == "initial" and ref_model is None:  # None would silently mean "ref: policy"
            raise ValueError("implicit_prm.ref: 'initial' needs a reference model, and the context gave none")
        if temperature is None:
            temperature = ctx.cfg.rollout.temperature
        return cls(prm, ref_model, task=ctx.task, beta=beta, level=level, granularity=granularity,
                   micro_batch=micro_batch, temperature=temperature, update=update, loss=loss, lr=lr,
                   grad_clip=grad_clip, norm=norm, owns_model=copy_policy)

    def labels(self, traj) -> torch.Tensor:
        """(B,) float outcome labels from the task verifier."""
        return torch.tensor([self.task.verify(ex, t) for ex, t in zip(traj.examples, traj.response_texts)],
                            dtype=torch.float32, device=traj.response_ids.device)

    def _loss(self, prm_lp, ref_lp, traj):
        labels = self.labels(traj)
        mask = traj.loss_mask
        if self.loss_name == "ce":
            return implicit_prm_ce_loss(prm_lp, ref_lp, mask, labels, beta=self.beta)
        return implicit_prm_dpo_loss(prm_lp, ref_lp, mask, labels, traj.group_ids, beta=self.beta)

    def _step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        check_finite("implicit_prm loss", loss)
        loss.backward()
        return clip_and_step(self.prm_model.parameters(), self.optimizer, self.grad_clip, "implicit_prm update")

    def _output(self, log_ratio: torch.Tensor, traj) -> RewardOutput:
        out = self.output_from_log_ratio(log_ratio, traj)
        if self.norm == "batch_norm" and out.level == "token":
            out.values = prime_batch_norm(out.values, out.mask)
        return out

    @torch.no_grad()
    def step_scores(self, traj) -> tuple[list[list[float]], float]:
        """Step scores for the trainer's evaluation (no optimizer state, no kept graph):
        r_{b,k} = β Σ_{t ∈ step k} (log π_φ − log π_ref)(y_t), the implicit PRM's step reward,
        and the threshold 0 below which a step counts as judged wrong (the PRM then rates the
        step below the reference). Returns B lists of S_b floats (the steps of row b that hold a
        response token) and the threshold."""
        if self.owns_model:
            self.prm_model.eval()
        token_r = self.beta * self.log_ratio(traj)                                     # (B, L)
        S = int(traj.step_ids.max().clamp(min=-1)) + 1
        values, step_mask = implicit_step_rewards(token_r, traj.response_mask, traj.step_ids, S)  # (B, S) each
        return [v[m].tolist() for v, m in zip(values.cpu(), step_mask.cpu())], 0.0

    @property
    def update_when(self) -> str | None:
        """When the trainer calls ``update``: 'before' scoring, 'after' the policy update, or never."""
        return {"after": "after", "before": "before", "none": None}[self.update_mode]

    def __call__(self, traj) -> RewardOutput:
        """Score the batch; never takes an optimizer step (that is ``update``, a stage of the loop).
        In 'after' mode the forward keeps its graph so ``update`` reuses it. A shared model
        (``copy_policy=False``) keeps the train/eval mode its owner set."""
        if self.owns_model:
            self.prm_model.train()
        if self.update_mode == "after":
            prm_lp, ref_lp = self.logprobs(traj, grad=True)  # (B, L) each; graph kept for update()
            self._pending = (prm_lp, ref_lp, traj)
            return self._output((prm_lp.detach() - ref_lp), traj)
        return self._output(self.log_ratio(traj), traj)

    def update(self, traj) -> dict:
        """One PRM optimizer step on ``traj``; returns metrics (plain keys).

        'before': a fresh forward on the batch about to be scored. 'after': the forward kept by
        ``__call__`` on this same batch (refused for another batch).
        """
        if self.owns_model:
            self.prm_model.train()
        if self.update_mode == "before":
            prm_lp, ref_lp = self.logprobs(traj, grad=True)
        elif self.update_mode == "after":
            if self._pending is None or self._pending[2] is not traj:
                raise RuntimeError("implicit_prm.update: called on a batch it did not score")
            prm_lp, ref_lp, _ = self._pending
            self._pending = None
        else:
            return {}
        loss, metrics = self._loss(prm_lp, ref_lp, traj)
        gnorm = self._step(loss)
        return {"prm_loss": loss.detach(), "prm_grad_norm": gnorm, **metrics}

    def state_dict_for_checkpoint(self):
        return self.prm_model, ({"optimizer": self.optimizer.state_dict()} if self.optimizer is not None else {})

    def load_checkpoint(self, directory, extra: dict) -> None:
        load_weights_into(self.prm_model, directory)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(extra["optimizer"])
