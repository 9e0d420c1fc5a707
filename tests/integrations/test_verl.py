"""finegrain inside verl 0.9.1 (finegrain/integrations/verl.py, docs/verl.md).

Skipped when verl cannot be imported, unless FINEGRAIN_REQUIRE_VERL=1 (then the import error
fails the run). ``.ci/verl.sh`` builds the virtualenv these run in.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.verl

try:
    import verl  # noqa: F401
    from verl.trainer.ppo import core_algos
except ImportError:
    if os.environ.get("FINEGRAIN_REQUIRE_VERL") == "1":
        raise
    pytest.skip("verl is not installed (run .ci/verl.sh)", allow_module_level=True)

from omegaconf import OmegaConf  # noqa: E402  (comes with verl's hydra-core)

from finegrain.credit import ADVANTAGES  # noqa: E402
from finegrain.integrations import verl as fgv  # noqa: E402
from finegrain.losses import AGGREGATIONS, POLICY_LOSSES  # noqa: E402
from finegrain.losses.aggregate import aggregate  # noqa: E402
from finegrain.models.tokenizer import char_tokenizer  # noqa: E402
from finegrain.tasks import TASKS  # noqa: E402
from finegrain.tasks.base import STEP_CORRECT  # noqa: E402
from finegrain.trajectory import place_at_segment_ends  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ESTIMATORS = [n for n in ADVANTAGES.names() if not ADVANTAGES.meta(n).get("needs_values")]


def _batch(seed, B=6, L=9):
    """Random token rewards (sparse, some exact zeros), a right-padded response mask with a masked
    span inside (a tool output), and uids for 2 groups in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    mask[0, 2] = False
    r = torch.randn(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.4)
    r = torch.where(mask, r, torch.zeros(()))
    uids = np.array(["u-b", "u-a", "u-b", "u-a", "u-a", "u-b"][:B], dtype=object)
    groups = torch.tensor([0, 1, 0, 1, 1, 0][:B])
    return r, mask, uids, groups


def _expected_kwargs(name, gamma, scale):
    takes = {p for p, v in inspect.signature(ADVANTAGES.get(name)).parameters.items() if v.kind == v.KEYWORD_ONLY}
    return {k: v for k, v in {"gamma": gamma, "scale_by_std": scale}.items() if k in takes}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_looked_up_through_verl_equals_finegrain(name):
    fgv.register_with_verl()
    fn = core_algos.get_adv_estimator_fn("fg_" + name)
    r, mask, uids, groups = _batch(seed=len(name))
    cfg = OmegaConf.create({"gamma": 0.9, "norm_adv_by_std_in_grpo": False, "finegrain_kwargs": {}})
    adv, ret = fn(token_level_rewards=r, response_mask=mask.long(), index=uids, config=cfg)
    seg = fgv.turns_from_mask(mask) if ADVANTAGES.meta(name).get("segments") == "turn" else fgv.steps_from_rewards(r, mask)
    want = ADVANTAGES.get(name)(r, mask, groups, seg, **_expected_kwargs(name, 0.9, False))
    assert adv.shape == r.shape and torch.equal(adv, want) and torch.equal(ret, adv)
    # explicit step ids (a custom trainer's batch field) are used as given
    steps = torch.where(mask, torch.arange(r.shape[1])[None, :] // 3, torch.full_like(mask, -1, dtype=torch.long))
    key = "turn_ids" if ADVANTAGES.meta(name).get("segments") == "turn" else "step_ids"
    adv2, _ = fn(token_level_rewards=r, response_mask=mask.long(), index=uids, config=cfg, **{key: steps})
    assert torch.equal(adv2, ADVANTAGES.get(name)(r, mask, groups, steps, **_expected_kwargs(name, 0.9, False)))


def test_finegrain_kwargs_reach_the_estimator_and_are_checked():
    fn = core_algos.get_adv_estimator_fn("fg_spae")
    r, mask, uids, groups = _batch(seed=3)
    cfg = OmegaConf.create({"finegrain_kwargs": {"xi": 2.5, "whiten": False}})
    adv, _ = fn(token_level_rewards=r, response_mask=mask, index=uids, config=cfg)
    want = ADVANTAGES.get("spae")(r, mask, groups, fgv.steps_from_rewards(r, mask), xi=2.5, whiten=False)
    assert torch.equal(adv, want)
    assert not torch.equal(adv, ADVANTAGES.get("spae")(r, mask, groups, fgv.steps_from_rewards(r, mask)))
    with pytest.raises(ValueError, match="algorithm.finegrain_kwargs: unknown key 'nope'"):
        fn(token_level_rewards=r, response_mask=mask, index=uids, config=OmegaConf.create({"finegrain_kwargs": {"nope": 1}}))
    with pytest.raises(ValueError, match="index: estimator 'grpo'"):
        core_algos.get_adv_estimator_fn("fg_grpo")(token_level_rewards=r, response_mask=mask, config=None)


def _step_batch(seed):
    """4 samples of one prompt: 3 steps, a separator outside steps and an EOS after the last step;
    step rewards with exact zeros, placed as FinegrainRewardManager places them (on the last token of
    each step as the estimators count steps, TokenRewardScorer.counted_steps), the outcome on the
    last trained token."""
    g = torch.Generator().manual_seed(seed)
    step_ids = torch.tensor([[0, 0, -1, 1, 1, 1, 2, 2, -1]] * 4)
    mask = torch.ones(4, 9, dtype=torch.bool)
    values = torch.randn(4, 3, generator=g)
    values[0, 0] = values[1, 1] = values[2, 0] = values[2, 1] = 0.0
    counted = fgv.TokenRewardScorer.counted_steps(step_ids, mask)
    r = place_at_segment_ends(values, torch.ones(4, 3, dtype=torch.bool), counted, mask)
    r[:, -1] += torch.tensor([1.0, 0.0, 1.0, 0.0])
    return r, mask, step_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p2s_from_reward_layout_equals_p2s_with_true_steps(seed):
    """The module docstring's claim: steps_from_rewards is exact for p2s, zero-reward steps included."""
    r, mask, step_ids = _step_batch(seed)
    uids = np.array(["q"] * 4, dtype=object)
    adv, _ = core_algos.get_adv_estimator_fn("fg_p2s")(token_level_rewards=r, response_mask=mask, index=uids)
    want = ADVANTAGES.get("p2s")(r, mask, torch.zeros(4, dtype=torch.long), step_ids)
    assert torch.allclose(adv, want, atol=1e-6, rtol=0)


def test_spae_from_reward_layout_is_not_exact_with_a_zero_step():
    """...and the documented limit: spae needs the true step ids when a step's ΔΦ is exactly 0."""
    r, mask, step_ids = _step_batch(0)
    uids = np.array(["q"] * 4, dtype=object)
    fn = core_algos.get_adv_estimator_fn("fg_spae")
    derived, _ = fn(token_level_rewards=r, response_mask=mask, index=uids)
    given, _ = fn(token_level_rewards=r, response_mask=mask, index=uids, step_ids=step_ids)
    assert torch.equal(given, ADVANTAGES.get("spae")(r, mask, torch.zeros(4, dtype=torch.long), step_ids))
    assert not torch.allclose(derived, given)


def test_verl_grpo_sums_token_rewards_but_the_finegrain_path_keeps_steps_apart():
    L = 6
    mask = torch.ones(4, L, dtype=torch.bool)
    apart = torch.zeros(4, L)
    apart[:, 2] = torch.tensor([1.0, 0.0, 0.5, -1.0])     # a step reward on token 2 (end of step 0)
    apart[:, 5] = torch.tensor([0.0, 2.0, 0.5, 1.0])      # another on the last token (end of step 1)
    summed = torch.zeros(4, L)
    summed[:, -1] = apart.sum(1)
    uids = np.array(["p"] * 4, dtype=object)
    grpo = core_algos.get_adv_estimator_fn("grpo")
    a_apart, _ = grpo(token_level_rewards=apart, response_mask=mask, index=uids)
    a_summed, _ = grpo(token_level_rewards=summed, response_mask=mask, index=uids)
    assert torch.allclose(a_apart, a_summed)                            # verl: only the row sum counts
    assert torch.equal(a_apart, a_apart[:, :1].expand(4, L))            # one value per row
    p2s = core_algos.get_adv_estimator_fn("fg_p2s")
    f_apart, _ = p2s(token_level_rewards=apart, response_mask=mask, index=uids)
    f_summed, _ = p2s(token_level_rewards=summed, response_mask=mask, index=uids)
    assert not torch.allclose(f_apart[:, :3], f_apart[:, 3:])           # step 0 and step 1 get different credit
    assert not torch.allclose(f_apart, f_summed)


def _loss_batch(seed, B=5, L=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 3
    lp = old + 0.4 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, L, generator=g)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (B,), generator=g)[:, None]
    mask[3] = False                                        # a row with no trained token
    return lp, old, adv, mask


def _actor_cfg(**extra):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 3.0,
                             "global_batch_info": {}, **extra})


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_policy_loss_through_verl_equals_finegrain_loss_and_aggregation(name, mode):
    fgv.register_with_verl()
    lp, old, adv, mask = _loss_batch(seed=len(name) + len(mode))
    lp.requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn("fg_" + name)(
        old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask.long(), loss_agg_mode=mode, config=_actor_cfg())
    kw = {"clip_low": 0.1, "clip_high": 0.3, "dual_clip_c": 3.0} if name == "ppo_clip" else {}
    lp2 = lp.detach().clone().requires_grad_(True)
    per_token, fg_metrics = POLICY_LOSSES.get(name)(lp2, old, adv, mask, **kw)
    want = aggregate(per_token, mask, mode)
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-7)
    loss.backward()
    want.backward()
    assert torch.allclose(lp.grad, lp2.grad, rtol=1e-5, atol=1e-7)
    assert metrics == {f"actor/fg_{k}": float(v) for k, v in fg_metrics.items()}


def test_global_normalisers_and_is_weights_follow_verl():
    lp, old, adv, mask = _loss_batch(seed=9)
    fn = core_algos.get_policy_loss_fn("fg_reinforce")
    n_tok = int(mask.sum())
    # verl's global token count over a batch split in two micro-batches: the halves add up to the whole
    cfg = _actor_cfg(global_batch_info={"dp_size": 1, "batch_num_tokens": n_tok})
    halves = sum(fn(old_log_prob=old[s], log_prob=lp[s], advantages=adv[s], response_mask=mask[s],
                    loss_agg_mode="token-mean", config=cfg)[0] for s in (slice(0, 2), slice(2, None)))
    whole, _ = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
                  config=_actor_cfg())
    assert torch.allclose(halves, whole, rtol=1e-6)
    w = torch.rand_like(lp) + 0.5
    weighted, _ = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
                     config=_actor_cfg(), rollout_is_weights=w)
    per_token, _ = POLICY_LOSSES.get("reinforce")(lp, old, adv, mask)
    assert torch.allclose(weighted, aggregate(per_token * w, mask, "token-mean"), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_agg_mode: finegrain's losses take one of"):
        fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="token-sum", config=_actor_cfg())


def test_fg_ppo_clip_equals_verls_vanilla_loss():
    """Same clip range and verl's always-on dual clip: finegrain's ppo_clip is verl's vanilla PPO loss."""
    lp, old, adv, mask = _loss_batch(seed=4)
    cfg = _actor_cfg()
    ours, _ = core_algos.get_policy_loss_fn("fg_ppo_clip")(old_log_prob=old, log_prob=lp, advantages=adv,
                                                           response_mask=mask, loss_agg_mode="token-mean", config=cfg)
    theirs, _ = core_algos.get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=lp, advantages=adv,
                                                         response_mask=mask, loss_agg_mode="token-mean", config=cfg)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_registering_twice_is_harmless_and_clobbering_verl_is_refused():
    first = fgv.register_with_verl()
    before = dict(core_algos.ADV_ESTIMATOR_REGISTRY), dict(core_algos.POLICY_LOSS_REGISTRY)
    assert fgv.register_with_verl() == first
    assert (dict(core_algos.ADV_ESTIMATOR_REGISTRY), dict(core_algos.POLICY_LOSS_REGISTRY)) == before
    assert set(first["skipped"]) == {"gae"} and "fg_gae" not in core_algos.ADV_ESTIMATOR_REGISTRY
    with pytest.raises(ValueError, match="verl already has other entries named grpo, rloo"):
        fgv.register_with_verl(prefix="")
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage


def test_external_module_registers_in_a_fresh_process():
    """VERL_USE_EXTERNAL_MODULES (read by ``import verl``) is what puts the names into each worker."""
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
            "print(get_adv_estimator_fn('fg_p2s').__name__, get_policy_loss_fn('fg_ppo_clip').__name__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "finegrain.integrations.verl"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["finegrain_p2s", "finegrain_ppo_clip"]


# ---------------------------------------------------------------- rewards
ALPHABET = "0123456789+-*/=:AQ \n"
SETTINGS = {"task": "arith", "segmenter": "newline",
            "rewards": [{"name": "verifier", "weight": 1.0}, {"name": "step_labels", "weight": 0.5}]}


def _sample(tok, response_text, example):
    from verl import DataProto

    prompt = tok(example.prompt, add_special_tokens=False)["input_ids"]
    resp = tok(response_text, add_special_tokens=False)["input_ids"]
    P, L = len(prompt) + 2, len(resp) + 3                        # padding on both sides, as verl's batches
    prompts = torch.tensor([0] * (P - len(prompt)) + prompt)
    responses = torch.tensor(resp + [0] * (L - len(resp)))
    attn = torch.cat([torch.tensor([0] * (P - len(prompt)) + [1] * len(prompt)),
                      torch.tensor([1] * len(resp) + [0] * (L - len(resp)))])
    return DataProto.from_dict(
        tensors={"prompts": prompts[None], "responses": responses[None], "attention_mask": attn[None]},
        non_tensors={"reward_model": np.array([{"ground_truth": example.answer}], dtype=object),
                     "extra_info": np.array([{**example.meta, "index": 0}], dtype=object),
                     "data_source": np.array(["arith"], dtype=object)})


def _manager(tok):
    cfg = OmegaConf.create({"reward": {"custom_reward_function": {"reward_kwargs": SETTINGS}}})
    return fgv.FinegrainRewardManager(config=cfg, tokenizer=tok, compute_score=None)


def test_reward_manager_puts_step_and_outcome_rewards_on_their_tokens():
    tok = char_tokenizer(ALPHABET)
    task = TASKS.get("arith")()
    ex = task.examples("train")[0]
    lines = ex.solution.split("\n")
    lines[1] = lines[1][:-1] + str((int(lines[1][-1]) + 1) % 10)   # a wrong second line
    response = "\n".join(lines)
    labels = task.label_steps(ex, response)
    manager = _manager(tok)                                      # verl runs run_single on the manager's loop
    out = manager.loop.run_until_complete(manager.run_single(_sample(tok, response, ex)))
    scores = out["reward_score"]
    assert len(scores) == len(response)                          # one reward per real response token
    ends = [i for i, c in enumerate(response) if c == "\n"] + [len(response) - 1]
    step_values = [0.0 if lab == STEP_CORRECT else -1.0 for lab in labels.labels]
    assert step_values.count(-1.0) >= 1
    want = [0.0] * len(response)
    for pos, v in zip(ends, step_values):
        want[pos] += 0.5 * v
    want[-1] += task.verify(ex, response)
    assert scores == pytest.approx(want, abs=0)
    assert any(v != 0 for v in want[:-1])                        # a step reward sits before the last token
    assert out["reward_extra_info"]["fg/verifier"] == task.verify(ex, response)


def test_reward_manager_assembles_a_bs_by_l_tensor_unsummed():
    scores = [[0.0, -0.5, 0.0, 1.0], [0.25, 0.0]]
    data = type("D", (), {"batch": {"responses": torch.zeros(2, 6, dtype=torch.long)}})()
    rm = fgv.FinegrainRewardManager.assemble_rm_scores(data, scores)
    assert rm.shape == (2, 6)
    assert rm.tolist() == [[0.0, -0.5, 0.0, 1.0, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"reward_score\[0\]: 7 token rewards"):
        fgv.place_token_rewards([[0.0] * 7], 6)


def test_reward_manager_refuses_missing_settings_and_unknown_signals():
    tok = char_tokenizer(ALPHABET)
    with pytest.raises(ValueError, match="reward_kwargs: FinegrainRewardManager needs"):
        fgv.FinegrainRewardManager(config=OmegaConf.create({"reward": {}}), tokenizer=tok, compute_score=None)
    with pytest.raises(KeyError, match="unknown reward signal 'nope'"):
        fgv.TokenRewardScorer(tok, task="arith", rewards=[{"name": "nope", "weight": 1.0}])
    with pytest.raises(ValueError, match=r"rewards\[0\].weight: expected a finite number"):
        fgv.TokenRewardScorer(tok, task="arith", rewards=[{"name": "verifier"}])


def test_agent_loop_output_writes_token_rewards_on_the_response():
    out_cls = fgv.TokenRewardAgentLoopOutput
    o = out_cls(prompt_ids=[5, 6], response_ids=[7, 8, 9], response_mask=[1, 1, 1], metrics={})
    o.reward_score = [0.0, 0.5, 1.0]                 # what verl's _compute_score assigns from run_single
    assert o.as_dict()["rm_scores"].tolist() == [0.0, 0.5, 1.0]
    o2 = out_cls(prompt_ids=[5, 6], response_ids=[7, 8, 9], response_mask=[1, 1, 1], metrics={})
    o2.reward_score = 2.0                            # a float keeps verl's behaviour: on the last token
    assert o2.as_dict()["rm_scores"].tolist() == [0.0, 0.0, 2.0]


# ---------------------------------------------------------------- the example config
def test_example_config_composes_and_names_registered_parts():
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=str(REPO / "examples" / "verl"), version_base=None):
        cfg = compose(config_name="finegrain_p2s")
    assert core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator) is fgv.verl_estimator("p2s")
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)           # verl's own ActorConfig checks
    assert core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode) is fgv.verl_policy_loss("ppo_clip")
    assert fgv.loss_kwargs("ppo_clip", actor) == {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 3.0}
    assert fgv.estimator_kwargs("p2s", cfg.algorithm) == {"scale_by_std": True, "eps": 1e-6}
    assert resolve_reward_manager_cls(cfg) is fgv.FinegrainRewardManager
    fgv.TokenRewardScorer(char_tokenizer(ALPHABET), **fgv._plain(cfg.reward.custom_reward_function.reward_kwargs))
    loops = OmegaConf.load(REPO / cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    entry = next(e for e in loops if e.name == cfg.actor_rollout_ref.rollout.agent.default_agent_loop)
    from hydra.utils import get_class
    assert get_class(entry._target_) is fgv.FinegrainSingleTurnAgentLoop
    assert cfg.trainer.use_v1 is True                                     # the path the agent loop covers


def test_example_data_script_rows_score_through_the_manager(tmp_path):
    """examples/verl/make_arith_data.py writes parquet rows whose meta survives (meta_json): a gold
    solution scores verifier 1 and no wrong step."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("make_arith_data", REPO / "examples" / "verl" / "make_arith_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path), "--train", "3", "--test", "2"])
    df = pd.read_parquet(tmp_path / "train.parquet")
    assert len(df) == 3 and len(pd.read_parquet(tmp_path / "test.parquet")) == 2
    row = df.iloc[0]
    task = TASKS.get("arith")()
    ex = task.examples("train")[0]
    tok = char_tokenizer(ALPHABET)
    scorer = fgv.TokenRewardScorer(tok, **SETTINGS)
    extra = {k: v for k, v in row["extra_info"].items()}
    traj = scorer.trajectory([tok(row["prompt"][0]["content"], add_special_tokens=False)["input_ids"]],
                             [tok(ex.solution, add_special_tokens=False)["input_ids"]],
                             [row["reward_model"]["ground_truth"]], [extra])
    assert traj.examples[0].meta["ops"] == ex.meta["ops"] and traj.examples[0].answer == ex.answer
    tokens, per_source = scorer.score(traj)
    assert float(per_source["verifier"].sum()) == 1.0 and float(per_source["step_labels"].abs().sum()) == 0.0
    wrong = ex.solution.replace(ex.solution.split("\n")[0], ex.solution.split("\n")[0][:-1] + "0", 1)
    traj2 = scorer.trajectory([[]], [tok(wrong, add_special_tokens=False)["input_ids"]], [ex.answer], [extra])
    assert float(scorer.score(traj2)[1]["step_labels"].sum()) < 0     # the meta really drives step_labels
