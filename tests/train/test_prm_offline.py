"""Offline implicit-PRM training and scoring on a micro model (char tokenizer, ~10k parameters)."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import finegrain.train.prm_offline as prm_offline
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards.prm_data import PRMRow
from finegrain.segment import newline
from finegrain.train.prm_offline import (fit_metrics, group_batches, groups_with_pairs, row_batches, score_prm,
                                         train_prm)

ALPHABET = "0123456789+-*=:AQ \n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("micro")
    tiny_causal_lm(tok, size="micro", seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def load(d):
    return AutoModelForCausalLM.from_pretrained(d).eval()


def add_rows():
    """16 rows: 8 prompts 'Q: a+b', each with a right (label 1) and a wrong (label 0) answer."""
    rows = []
    for a in range(1, 5):
        for b in range(1, 3):
            p = f"Q: {a}+{b}\n"
            rows.append(PRMRow(p, f"{a}+{b}={a + b}\nA: {a + b}", 1.0, p))
            rows.append(PRMRow(p, f"{a}+{b}={a + b + 1}\nA: {a + b + 1}", 0.0, p))
    return rows


def read_log(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- batching


def test_row_batches_is_a_permutation_cut_in_order():
    b = row_batches(10, 4, random.Random(3))
    assert [len(x) for x in b] == [4, 4, 2]
    assert sorted(i for x in b for i in x) == list(range(10))
    assert b == row_batches(10, 4, random.Random(3))


@pytest.mark.parametrize("seed", range(5))
def test_group_batches_never_split_groups(seed):
    rng = random.Random(seed)
    gids = [rng.randrange(7) for _ in range(30)]                    # non-contiguous groups of any size
    size = 5
    batches = group_batches(gids, size, random.Random(seed))
    assert sorted(i for b in batches for i in b) == list(range(30))  # every row exactly once
    where = {}
    for k, b in enumerate(batches):
        for i in b:
            where.setdefault(gids[i], set()).add(k)
        # over the limit only when the batch is one group larger than the limit
        assert len(b) <= size or len({gids[i] for i in b}) == 1
    assert all(len(ks) == 1 for ks in where.values())


def test_groups_with_pairs_drops_groups_without_a_label_difference():
    rows = [PRMRow("p", "a", 1.0, "g1"), PRMRow("p", "b", 1.0, "g2"), PRMRow("p", "c", 0.0, "g1"),
            PRMRow("p", "d", 1.0, "g2"), PRMRow("p", "e", 0.5, "g3")]
    assert groups_with_pairs(rows) == [0, 2]


# ----------------------------------------------------------------------------- metrics


def test_fit_metrics_worked_example():
    z = torch.tensor([1.0, -1.0, 0.5, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    gids = torch.tensor([0, 0, 1, 1])
    m = fit_metrics(z, labels, gids)
    sp = lambda x: math.log1p(math.exp(x))                           # softplus; −log σ(x) = sp(−x)
    # CE: −log σ(1), −log(1−σ(−1)) = sp(−1), −log(1−σ(0.5)) = sp(0.5), −log σ(0.5) = sp(−0.5)
    assert m["ce_loss"] == pytest.approx((sp(-1) + sp(-1) + sp(0.5) + sp(-0.5)) / 4, rel=1e-6)
    assert m["acc"] == 0.75                                          # row 2: z > 0 but label 0
    # pairs: (0 over 1) margin 2; (3 over 2) margin 0 -> log 2 and a half-right tie
    assert m["dpo_loss"] == pytest.approx((sp(-2) + math.log(2)) / 2, rel=1e-6)
    assert m["pair_acc"] == 0.75 and m["n_pairs"] == 2
    assert m["score_mean"] == pytest.approx(0.25, abs=1e-7)


# ----------------------------------------------------------------------------- training


def test_ce_training_lowers_loss_and_raises_accuracy(tmp_path, model_dir, tok):
    prm, ref = load(model_dir), load(model_dir)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    out = tmp_path / "ce"
    last = train_prm(prm, ref, tok, add_rows(), loss="ce", beta=1.0, lr=3e-3, epochs=10, batch_size=8,
                     seed=0, out_dir=out, progress=False)
    log = read_log(out / "prm_metrics.jsonl")
    assert [r["epoch"] for r in log] == list(range(11))
    first = log[0]
    # prm == ref before training: z = 0 for every row -> CE = log 2, acc = ½ (z > 0 is False)
    assert first["fit/ce_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["fit/acc"] == 0.5
    assert last == log[-1]
    assert last["fit/ce_loss"] < first["fit/ce_loss"] - 0.1
    assert last["fit/acc"] >= 0.75
    assert last["train/steps"] == 2 and last["train/rows"] == 16
    assert all(math.isfinite(v) for r in log for v in r.values())
    # the reference never changes; the saved PRM is the trained one and loads back
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    saved = load(out)
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in prm.state_dict().items() if k in saved.state_dict())
    info = json.loads((out / "finegrain_prm.json").read_text())
    assert info["beta"] == 1.0 and info["loss"] == "ce" and info["segmenter"] == "newline"


def test_dpo_trains_on_whole_groups(tmp_path, model_dir, tok, monkeypatch):
    rows = add_rows()
    rows = rows[::2] + rows[1::2]                                     # groups are not contiguous
    rows += [PRMRow("Q: 9+9\n", "9+9=18\nA: 18", 1.0, "same"), PRMRow("Q: 9+9\n", "A: 18", 1.0, "same")]
    seen = []
    real_step = prm_offline._train_step

    def spy(signal, opt, tokenizer, batch, **kw):
        seen.append([r.group for r in batch])
        return real_step(signal, opt, tokenizer, batch, **kw)

    monkeypatch.setattr(prm_offline, "_train_step", spy)
    prm, ref = load(model_dir), load(model_dir)
    out = tmp_path / "dpo"
    last = train_prm(prm, ref, tok, rows, loss="dpo", beta=1.0, lr=3e-3, epochs=6, batch_size=5, seed=1,
                     out_dir=out, progress=False)
    log = read_log(out / "prm_metrics.jsonl")
    # the 'same' group has no pair and is not trained on; each group lies inside one batch
    assert last["train/rows"] == 16 and all("same" not in b for b in seen)
    for b in seen:
        assert len(b) <= 5 and all(b.count(g) == 2 for g in b)       # both responses of each prompt
    assert len(seen) == 6 * 4                                          # 8 groups of 2, at most 2 per batch
    assert log[0]["fit/dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and log[0]["fit/n_pairs"] == 8
    assert last["fit/dpo_loss"] < log[0]["fit/dpo_loss"] - 0.1
    assert last["fit/pair_acc"] >= 0.75


def test_dpo_without_pairs_and_bad_arguments_raise(tmp_path, model_dir, tok):
    prm, ref = load(model_dir), load(model_dir)
    rows = [PRMRow("Q: 1+1\n", "A: 2", 1.0, "a"), PRMRow("Q: 1+2\n", "A: 4", 0.0, "b")]
    with pytest.raises(ValueError, match="no pair"):
        train_prm(prm, ref, tok, rows, loss="dpo", out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="loss: expected one of ce, dpo"):
        train_prm(prm, ref, tok, rows, loss="kto", out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="same object"):
        train_prm(prm, prm, tok, add_rows(), out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="beta: expected a finite number > 0"):
        train_prm(prm, ref, tok, rows, beta=0.0, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="missing field 'label'"):
        train_prm(prm, ref, tok, [PRMRow("Q: 1\n", "A: 1", None, "g", "d.jsonl:1")], out_dir=tmp_path / "x",
                  progress=False)
    long_row = PRMRow("Q: 1\n", "1" * 600, 1.0, "g", "d.jsonl:7")       # BOS + 5 + 600 + EOS > 512 positions
    with pytest.raises(ValueError, match=r"d.jsonl:7: prompt \+ response is 607 tokens"):
        train_prm(prm, ref, tok, [long_row], out_dir=tmp_path / "x", progress=False)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, model_dir, tok, monkeypatch):
    kw = dict(loss="ce", beta=1.0, lr=3e-3, epochs=3, batch_size=6, seed=2, progress=False)
    prm_a = load(model_dir)
    train_prm(prm_a, load(model_dir), tok, add_rows(), out_dir=tmp_path / "a", **kw)

    real_step, calls = prm_offline._train_step, []

    def crash_in_epoch_2(*a, **k):                                    # 3 steps per epoch; die at step 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(prm_offline, "_train_step", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_prm(load(model_dir), load(model_dir), tok, add_rows(), out_dir=tmp_path / "b", **kw)
    assert [r["epoch"] for r in read_log(tmp_path / "b" / "prm_metrics.jsonl")] == [0, 1]
    assert not (tmp_path / "b" / "model.safetensors").exists()
    monkeypatch.setattr(prm_offline, "_train_step", real_step)
    prm_b = load(model_dir)                                           # fresh weights; the checkpoint restores them
    train_prm(prm_b, load(model_dir), tok, add_rows(), out_dir=tmp_path / "b", **kw)

    for k, v in prm_a.state_dict().items():
        assert torch.equal(v, prm_b.state_dict()[k]), k
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    log_a, log_b = (read_log(tmp_path / d / "prm_metrics.jsonl") for d in "ab")
    assert strip(log_a) == strip(log_b)

    # a finished run asked for the same epochs trains nothing; a lost log is re-measured at the last epoch
    (tmp_path / "b" / "prm_metrics.jsonl").unlink()
    prm_c = load(model_dir)
    last = train_prm(prm_c, load(model_dir), tok, add_rows(), out_dir=tmp_path / "b", **kw)
    assert [r["epoch"] for r in read_log(tmp_path / "b" / "prm_metrics.jsonl")] == [3] and last["epoch"] == 3
    assert last["fit/ce_loss"] == pytest.approx(read_log(tmp_path / "a" / "prm_metrics.jsonl")[-1]["fit/ce_loss"],
                                                abs=1e-6)
    assert all(torch.equal(v, prm_c.state_dict()[k]) for k, v in prm_a.state_dict().items())

    # a checkpoint of a different run is refused, naming what differs
    with pytest.raises(ValueError, match=r"another run \(lr"):
        train_prm(load(model_dir), load(model_dir), tok, add_rows(), out_dir=tmp_path / "b", **{**kw, "lr": 1e-3})


# ----------------------------------------------------------------------------- scoring


def loop_token_rewards(prm, ref, tok, row, beta):
    """β (log π_φ − log π_ref) per response token (EOS included), one unpadded row at a time."""
    p = tok(row.prompt, add_special_tokens=True)["input_ids"]
    r = tok(row.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    out = []
    with torch.no_grad():
        lps = []
        for m in (prm, ref):
            logp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)   # (T, V)
            lps.append([float(logp[len(p) - 1 + t, r[t]]) for t in range(len(r))])
    for a, b in zip(*lps):
        out.append(beta * (a - b))
    return out


def test_score_equals_unbatched_loop(model_dir, tok):
    ref = load(model_dir)
    prm = tiny_causal_lm(tok, size="micro", seed=1).eval()           # any other weights: rewards ≠ 0
    rows = [PRMRow("Q: 3+4\n", "3+4=7\nA: 7", 1.0, "a"),
            PRMRow("Q: 12 *3 -4\n", "12*3=36\n36-4=31\nA: 31", 0.0, "b"),
            PRMRow("Q: 1\n", "", None, "c"),                           # only the EOS is scored
            PRMRow("Q: 2+2\n", "2+2=4\n\nA: 4\n", None, "d")]          # blank line: not a step
    beta = 0.3
    for batch_size in (1, 3):
        scores = score_prm(prm, ref, tok, rows, beta=beta, batch_size=batch_size)
        for row, sc in zip(rows, scores):
            want = loop_token_rewards(prm, ref, tok, row, beta)
            assert sc["token_rewards"] == pytest.approx(want, abs=1e-5)
            assert sc["tokens"][:-1] == list(row.response) and sc["tokens"][-1] == tok.eos_token
            spans = newline(row.response)
            assert sc["step_spans"] == [list(s) for s in spans]
            # step k = tokens whose (single) character lies in span k
            steps = [sum(want[a:b]) for a, b in spans]
            assert sc["step_rewards"] == pytest.approx(steps, abs=1e-5)
            assert sc["seq_sum"] == pytest.approx(sum(want), abs=1e-5)
            assert sc["sequence_score"] == pytest.approx(min(steps) if steps else 0.0, abs=1e-5)
    assert len(scores[2]["step_rewards"]) == 0 and scores[2]["sequence_score"] == 0.0
    for how, fn in (("sum", sum), ("mean", lambda s: sum(s) / len(s)), ("last", lambda s: s[-1])):
        sc = score_prm(prm, ref, tok, rows[:2], beta=beta, aggregate=how)
        for s in sc:
            assert s["sequence_score"] == pytest.approx(fn(s["step_rewards"]), abs=1e-6)


def test_prm_equal_to_ref_gives_zero_rewards(model_dir, tok):
    prm, ref = load(model_dir), load(model_dir)
    rows = [PRMRow("Q: 3+4\n", "3+4=7\nA: 7", 1.0, "a"), PRMRow("Q: 5\n", "A: 5\n", 0.0, "a")]
    for sc in score_prm(prm, ref, tok, rows, beta=0.05, batch_size=2):
        assert set(sc["token_rewards"]) == {0.0}
        assert set(sc["step_rewards"]) == {0.0} and sc["sequence_score"] == 0.0 and sc["seq_sum"] == 0.0


def test_score_restores_train_mode_and_rejects_bad_arguments(model_dir, tok):
    prm, ref = load(model_dir), load(model_dir)
    prm.train()
    rows = [PRMRow("Q: 1\n", "A: 1", None, "a")]
    score_prm(prm, ref, tok, rows)
    assert prm.training and not ref.training
    with pytest.raises(KeyError, match="unknown step score aggregation 'max'"):
        score_prm(prm, ref, tok, rows, aggregate="max")
    with pytest.raises(KeyError, match="unknown segmenter"):
        score_prm(prm, ref, tok, rows, segmenter="sentences")
