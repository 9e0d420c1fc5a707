"""The discriminative PRM: head and BCE by hand, step-label data (JSONL, MC, HRM), the ``disc_prm`` reward."""

import hashlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from finegrain.eval.scoring import eval_meta, eval_names, scorer_kwargs, scores_from_output
from finegrain.losses.disc_prm import step_bce_loss
from finegrain.models.step_classifier import (StepClassifier, collate, encode_steps, load_step_classifier,
                                              step_logits)
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.disc_prm import DiscriminativePRM, map_step_reward
from finegrain.rewards.disc_prm_data import (StepRow, confined_path, hrm_merged_rows, mc_label, mc_step_labels,
                                             parse_step_row, read_step_data, response_rows, task_rows)
from finegrain.rewards.prm_data import PRMRow, to_trajectory
from finegrain.sampling.base import Completions, SamplingParams
from finegrain.segment import newline
from finegrain.tasks.arith import ArithTask
from tests.helpers import close

ALPHABET = "0123456789+-*=:AQ \n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def micro_classifier(tokenizer, seed=0):
    return StepClassifier(tiny_causal_lm(tokenizer, size="micro", seed=seed, max_positions=64)).eval()


# ----------------------------------------------------------------------------- the head and the loss by hand


def test_head_reads_the_last_token_of_each_step_by_hand(tok):
    model = micro_classifier(tok)
    with torch.no_grad():
        model.head.weight.copy_(torch.linspace(-1, 1, model.head.weight.shape[1])[None])
        model.head.bias.fill_(0.25)
    ids, pos = encode_steps(tok, "Q: 1 +2\n", ["1+2=3\n", "A: 3"])
    # BOS + 8 prompt characters = positions 0..8; step 1 is positions 9..14 (its "\n" at 14); step 2 is 15..18
    assert pos == [14, 18] and tok.convert_ids_to_tokens(ids[14]) == "\n"
    with torch.no_grad():
        h = model.lm.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]     # (T, H)
        by_hand = [float(h[p] @ model.head.weight[0] + 0.25) for p in pos]         # s_k = w·h_e(k) + b
        ids_t, am, read, mask = collate([(ids, pos)], tok.pad_token_id)
        close(model(ids_t, am, read)[0], by_hand)
    assert mask.tolist() == [[True, True]]


def test_padding_and_a_longer_row_do_not_change_a_rows_logits(tok):
    model = micro_classifier(tok)
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    a = encode_steps(tok, "Q: 1 +2\n", ["1+2=3\n", "A: 3"])
    b = encode_steps(tok, "Q: 12 +3 *2\n", ["12+3=15\n", "15*2=30\n", "A: 30"])
    alone = model(*collate([a], tok.pad_token_id)[:3])[0]
    batched = model(*collate([a, b], tok.pad_token_id)[:3])[0, :2]
    close(batched, alone)


def test_bce_worked_example_hard_and_soft_labels():
    logits = torch.tensor([[0.0, 2.0, 5.0], [math.log(3.0), 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, float("nan")], [0.75, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, m = step_bce_loss(logits, labels, mask)
    # step (0,0): s=0, y=1 -> log 2;  step (0,1): s=2, y=0 -> log(1 + e^2);
    # step (1,0): σ(log 3) = 3/4 and y = 3/4 -> the entropy −(¾ log ¾ + ¼ log ¼); the masked NaN is ignored
    terms = [math.log(2), math.log(1 + math.e ** 2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    close(loss, sum(terms) / 3)
    # predictions (s > 0): 0, 1, 1 against labels > ½: 1, 0, 1 -> one of three right
    close(m["acc"], 1 / 3)
    close(m["prob_mean"], (0.5 + 1 / (1 + math.e ** -2) + 0.75) / 3)
    assert int(m["n_steps"]) == 3


def test_bce_gradient_is_sigma_minus_label_over_the_step_count():
    s = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, _ = step_bce_loss(s, torch.tensor([[1.0, 0.25]]), torch.tensor([[True, True]]))
    loss.backward()
    # dℓ/ds_k = (σ(s_k) − y_k) / |K|
    close(s.grad, [[(0.5 - 1.0) / 2, (1 / (1 + math.e ** -1) - 0.25) / 2]])


def test_bce_without_labelled_steps_is_zero():
    loss, m = step_bce_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss) == 0.0 and int(m["n_steps"]) == 0


def test_reward_maps():
    close(torch.tensor([map_step_reward(math.log(3.0), h) for h in ("prob", "centered", "log")]),
          [0.75, 0.25, math.log(0.75)])
    assert map_step_reward(-800.0, "log") == -800.0 and map_step_reward(-800.0, "prob") == 0.0


# ----------------------------------------------------------------------------- JSONL formats


def write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_both_jsonl_formats_and_ratings(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        {"prompt": "Q: 1 +2\n", "steps": ["1+2=3", "A: 3"], "labels": [1, 0.5], "id": 7},
        {"problem": "Q: 2 +2\n", "steps": ["2+2=5", "5+1=6", "A: 6"], "label": 0},
        {"problem": "Q: 3 +1\n", "steps": ["3+1=4", "A: 4"], "label": -1},
        {"prompt": "Q", "completions": ["a", "b", "c"], "ratings": [1, 0, -1]},
        "",
    ])
    rows = read_step_data(f)
    assert [r.labels for r in rows] == [(1.0, 0.5), (0.0, None, None), (1.0, 1.0), (1.0, None, 0.0)]
    # every step but the last ends with a newline, so the steps concatenate to a newline-segmented response
    assert rows[0].steps == ("1+2=3\n", "A: 3") and rows[0].response == "1+2=3\nA: 3"
    assert rows[0].extra == {"id": 7} and rows[1].where == f"{f}:2"


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "Q", "steps": ["a"], "labels": [2]}', "field 'labels'[0] expected 0/1"),
    ('{"prompt": "Q", "steps": ["a", "b"], "label": 2}', "field 'label' expected the index of the first wrong step"),
    ('{"prompt": "Q", "steps": ["a"], "label": true}', "field 'label' expected the index"),
    ('{"prompt": "Q", "steps": [], "labels": []}', "field 'steps' expected a non-empty list"),
    ('{"prompt": "Q", "steps": ["a"]}', "missing field 'labels', 'ratings' or 'label'"),
    ('{"steps": ["a"], "labels": [1]}', "missing field 'prompt' (or 'problem')"),
    ('{"prompt": "Q", "problem": "Q", "steps": ["a"], "labels": [1]}', "fields 'prompt' and 'problem' both given"),
    ('{"prompt": "Q", "steps": ["a"], "ratings": [2]}', "field 'ratings'[0] expected -1, 0 or 1"),
    ('{"prompt": "Q", "steps": ["a"], "labels": [1]', "invalid JSON"),
])
def test_bad_rows_give_one_line_naming_file_and_line(tmp_path, line, message):
    f = write(tmp_path / "bad.jsonl", ['{"prompt": "Q", "steps": ["a"], "labels": [1]}', line])
    with pytest.raises(ValueError) as err:
        read_step_data(f)
    text = str(err.value)
    assert text.startswith(f"{f}:2: ") and message in text and "\n" not in text


def test_manifest_paths_are_confined_to_its_directory(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write(data / "sub" / "a.jsonl", [{"prompt": "Q", "steps": ["a"], "labels": [1]}])
    write(tmp_path / "outside.jsonl", [{"prompt": "Q", "steps": ["b"], "labels": [0]}])
    (data / "m.json").write_text(json.dumps({"files": ["sub/a.jsonl", "sub/../sub/a.jsonl"]}))
    assert [r.steps for r in read_step_data(data / "m.json")] == [("a",), ("a",)]
    for bad, why in (("../outside.jsonl", "leads outside"), (str(tmp_path / "outside.jsonl"), "absolute path")):
        (data / "m.json").write_text(json.dumps({"files": [bad]}))
        with pytest.raises(ValueError, match=why):
            read_step_data(data / "m.json")
    os.symlink(tmp_path / "outside.jsonl", data / "link.jsonl")
    with pytest.raises(ValueError, match="leads outside"):
        confined_path(data, "link.jsonl", "m.json: files[0]")
    (data / "m.json").write_text(json.dumps({"files": "sub/a.jsonl"}))
    with pytest.raises(ValueError, match="expected a manifest"):
        read_step_data(data / "m.json")


# ----------------------------------------------------------------------------- task, MC and HRM labels


def arith():
    return ArithTask(min_steps=2, max_steps=2, seed=0)


def test_task_rows_use_the_exact_labels():
    task = arith()
    pairs = task.sft_corpus(20, flawed_fraction=0.5, seed=0)
    rows = task_rows(task, pairs)
    for (ex, text), r in zip(pairs, rows):
        assert r.response == text and r.prompt == ex.prompt
        assert list(r.labels) == [1.0 if lab == 1 else 0.0 for lab in task.label_steps(ex, text).labels]
    assert any(0.0 in r.labels for r in rows) and any(all(lab == 1.0 for lab in r.labels) for r in rows)


class StubSampler:
    """Completions that depend only on (prefix, sample index): 'A: <answer>' right for some, wrong for others."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers
        self.calls = 0

    def complete(self, prefix, j):
        h = int(hashlib.sha1(f"{prefix}/{j}".encode()).hexdigest()[:8], 16)
        text = self.tokenizer.decode(prefix, skip_special_tokens=True)
        answer = self.answers[text.split("\n")[0] + "\n"]
        return f"A: {answer if h % 3 == 0 else int(answer) + 1}"

    def sample(self, prefixes, n, params, seed):
        self.calls += 1
        ids = [self.tokenizer(self.complete(list(p), j), add_special_tokens=False)["input_ids"]
               for p in prefixes for j in range(n)]
        return Completions(ids, [None] * len(ids), ["stop"] * len(ids))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_mc_labels_equal_a_loop_over_prefixes_and_rollouts(tok, mode):
    task = ArithTask(min_steps=2, max_steps=3, seed=0)
    pairs = task.sft_corpus(6, flawed_fraction=0.5, seed=1)
    rows = response_rows(task, pairs)
    sampler = StubSampler(tok, {ex.prompt: ex.answer for ex, _ in pairs})
    N = 5
    got = mc_step_labels(sampler, task, rows, n_rollouts=N, params=SamplingParams(), seed=0, mode=mode,
                         chunk_prefixes=4)
    for r, g in zip(rows, got):
        want = []
        for k in range(len(r.steps) - 1):
            prefix_text = "".join(r.steps[:k + 1])
            ids = tok(r.prompt)["input_ids"] + tok(prefix_text, add_special_tokens=False)["input_ids"]
            right = [task.verify(r.example, prefix_text + sampler.complete(ids, j)) >= 1 for j in range(N)]
            want.append((1.0 if any(right) else 0.0) if mode == "hard" else sum(right) / N)
        want.append(float(task.verify(r.example, r.response) >= 1))          # the last step: the response itself
        assert list(g.labels) == want and g.steps == r.steps
    # the chunking changes the calls, not the labels (the stub ignores the seed)
    again = mc_step_labels(sampler, task, rows, n_rollouts=N, params=SamplingParams(), seed=0, mode=mode,
                           chunk_prefixes=1000)
    assert [r.labels for r in again] == [r.labels for r in got]
    assert mc_label([False, False], "hard") == 0.0 and mc_label([True, False, False, False], "soft") == 0.25


def test_mc_labels_need_examples(tok):
    with pytest.raises(ValueError, match="need the task example"):
        mc_step_labels(StubSampler(tok, {}), arith(), [StepRow("Q", ("a\n", "b"), (None, None), "f:1")],
                       n_rollouts=2, params=SamplingParams(), seed=0)


def test_hrm_merge_labels_the_merged_step_as_the_later_one():
    r = StepRow("Q", ("a\n", "b\n", "c\n", "A: 1"), (1.0, 0.0, None, 1.0))
    got = [(m.steps, m.labels) for m in hrm_merged_rows([r])]
    # k = 1: steps 0+1 merged, labelled as step 1; k = 2 is unlabelled; k = 3: steps 2+3 merged after 0, 1
    assert got == [(("a\nb\n",), (0.0,)), (("a\n", "b\n", "c\nA: 1"), (1.0, 0.0, 1.0))]


# ----------------------------------------------------------------------------- the reward signal


@pytest.fixture(scope="module")
def bpe_prm_dir(tmp_path_factory):
    """A PRM with a locally trained BPE tokenizer (not the policy's), random backbone, non-zero head."""
    task = arith()
    texts = [ex.prompt + t for ex, t in task.sft_corpus(200, flawed_fraction=0.5, seed=0)]
    bpe = train_bpe_tokenizer(texts, vocab_size=300)
    model = micro_classifier(bpe, seed=3)
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    d = tmp_path_factory.mktemp("bpe_prm")
    model.save(d, bpe, {"segmenter": "newline"})
    return d


def ctx_for(task, policy=None):
    return SimpleNamespace(task=task, policy=policy, tokenizer=None, initial_policy=lambda: None)


def test_scores_through_text_equal_scoring_the_text_directly_across_tokenizers(tok, bpe_prm_dir):
    task = arith()
    pairs = task.sft_corpus(12, flawed_fraction=0.5, seed=2)
    pairs[3] = (pairs[3][0], "garbage with no newline")
    pairs[5] = (pairs[5][0], "")                                                   # a response without a step
    policy = micro_classifier(tok).lm
    traj = to_trajectory(tok, [PRMRow(ex.prompt, text, None, ex.prompt) for ex, text in pairs])
    traj = traj.replace(examples=[ex for ex, _ in pairs])
    signal = REWARDS.get("disc_prm").from_context(ctx_for(task, policy), path=str(bpe_prm_dir))
    out = signal(traj)
    assert out.level == "step" and out.values.shape == (12, 3)
    prm, bpe, info = load_step_classifier(bpe_prm_dir)
    assert info["kind"] == "discriminative" and len(bpe) != len(tok)
    for b, (ex, text) in enumerate(pairs):
        steps = [text[a:c] for a, c in newline(text)]
        assert out.mask[b].sum() == len(steps)
        if not steps:
            continue
        ids, pos = encode_steps(bpe, ex.prompt, steps)                             # one row, on its own
        with torch.no_grad():
            h = prm.lm.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            direct = [1 / (1 + math.exp(-float(h[p] @ prm.head.weight[0] + prm.head.bias[0]))) for p in pos]
        close(out.values[b, :len(steps)], direct)
        assert ids != tok(ex.prompt)["input_ids"] + tok(text, add_special_tokens=False)["input_ids"]
    # the step count is the segmenter's, so finegrain eval's adapter accepts the output
    scores = scores_from_output(out, traj, task)
    assert [len(s) for s in scores.step] == [out.mask[b].sum() for b in range(12)]
    close(out.components["prob_min"][:1], [min(out.values[0, :int(out.mask[0].sum())].tolist())])


def test_centered_and_log_rewards_and_the_registry_metadata(tok, bpe_prm_dir):
    task = arith()
    pairs = task.sft_corpus(4, flawed_fraction=0.5, seed=2)
    traj = to_trajectory(tok, [PRMRow(ex.prompt, text, None, ex.prompt) for ex, text in pairs])
    traj = traj.replace(examples=[ex for ex, _ in pairs])
    build = REWARDS.get("disc_prm").from_context
    p = build(ctx_for(task), path=str(bpe_prm_dir))(traj)
    c = build(ctx_for(task), path=str(bpe_prm_dir), reward="centered")(traj)
    lg = build(ctx_for(task), path=str(bpe_prm_dir), reward="log", micro_batch=1)(traj)
    close(c.values[c.mask], p.values[p.mask] - 0.5)
    close(lg.values[lg.mask], p.values[p.mask].log())
    assert "disc_prm" in eval_names()
    meta = eval_meta("disc_prm")
    assert (meta["vote"], meta["center"], meta["search_value"]) == ("identity", 0.5, "min")
    assert scorer_kwargs("disc_prm", {"path": "x"}) == {"reward": "prob", "path": "x"}
    with pytest.raises(ValueError, match="reward_kwargs.disc_prm.reward: expected one of prob"):
        scorer_kwargs("disc_prm", {"reward": "p-0.5"})


def test_missing_or_wrong_path_is_one_line(tmp_path):
    build = REWARDS.get("disc_prm").from_context
    with pytest.raises(ValueError, match="disc_prm.path: required"):
        build(ctx_for(arith()))
    with pytest.raises(ValueError, match="no such directory"):
        build(ctx_for(arith()), path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="is not a discriminative PRM directory"):
        build(ctx_for(arith()), path=str(tmp_path))


def test_step_logits_mark_steps_beyond_the_position_limit(tok):
    model = micro_classifier(tok)                                                  # 64 positions
    long_steps = ["1+1=2\n"] * 12                                                  # 9 + 72 tokens
    out = step_logits(model, tok, ["Q: 1 +1\n"], [long_steps])[0]
    # step k ends at position 8 + 6(k + 1): steps 0..8 fit in 64 positions, 9..11 do not
    assert all(v is not None for v in out[:9]) and out[9:] == [None] * 3
    DiscriminativePRM(model, tok, segmenter="newline")  # builds without a task
