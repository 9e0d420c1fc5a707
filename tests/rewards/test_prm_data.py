"""JSONL rows for offline implicit-PRM training: validation errors and the Trajectory they become."""

import json
import math

import pytest
import torch

from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer
from finegrain.rewards.prm_data import (PRMRow, encode_row, group_index, labels_tensor, parse_row, read_prm_jsonl,
                                       to_trajectory)

ALPHABET = "0123456789+-*=:AQ \nabxy"


def write_lines(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return path


def test_read_valid_rows_defaults_and_extras(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q1", "response": "a", "label": 1, "id": "x"}),
        "",                                                                   # blank lines are skipped
        json.dumps({"prompt": "Q1", "response": "b", "label": 0.25, "group": 7}),
        json.dumps({"prompt": "Q2", "response": "", "label": False, "group": None}),
    ])
    rows = read_prm_jsonl(f)
    assert [r.label for r in rows] == [1.0, 0.25, 0.0]
    assert [r.group for r in rows] == ["Q1", 7, "Q2"]                        # missing/null -> prompt text
    assert rows[0].extra == {"id": "x"} and rows[1].extra == {}
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert rows[0].to_json() == {"id": "x", "prompt": "Q1", "response": "a", "label": 1.0}
    assert rows[1].to_json()["group"] == 7


@pytest.mark.parametrize("obj, message", [
    ({"prompt": "q", "response": "r", "label": 2}, "field 'label' expected 0/1 or a number in [0, 1], got 2"),
    ({"prompt": "q", "response": "r", "label": -0.5}, "field 'label' expected 0/1 or a number in [0, 1], got -0.5"),
    ({"prompt": "q", "response": "r", "label": "1"}, "field 'label' expected 0/1 or a number in [0, 1], got \"1\""),
    ({"prompt": "q", "response": "r"}, "missing field 'label'"),
    ({"prompt": "q", "label": 1}, "missing field 'response'"),
    ({"prompt": 3, "response": "r", "label": 1}, "field 'prompt' expected a string, got 3"),
    ({"prompt": "q", "response": "r", "label": 1, "group": [1]}, "field 'group' expected a string or number"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_line_names_file_line_and_field(tmp_path, obj, message):
    good = json.dumps({"prompt": "q", "response": "r", "label": 1})
    f = write_lines(tmp_path / "bad.jsonl", [good, "", json.dumps(obj)])
    with pytest.raises(ValueError) as e:
        read_prm_jsonl(f)
    assert str(e.value).startswith(f"{f}:3: ")                                 # line 3: blank line counted
    assert message in str(e.value)


def test_nan_label_and_invalid_json(tmp_path):
    f = write_lines(tmp_path / "nan.jsonl", ['{"prompt": "q", "response": "r", "label": NaN}'])
    with pytest.raises(ValueError, match=r"nan.jsonl:1: field 'label'"):
        read_prm_jsonl(f)
    f = write_lines(tmp_path / "broken.jsonl", ['{"prompt": "q", "response": '])
    with pytest.raises(ValueError, match=r"broken.jsonl:1: invalid JSON"):
        read_prm_jsonl(f)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prm_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        read_prm_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_labels_optional_for_scoring(tmp_path):
    f = write_lines(tmp_path / "u.jsonl", [json.dumps({"prompt": "q", "response": "r"})])
    rows = read_prm_jsonl(f, require_label=False)
    assert rows[0].label is None and "label" not in rows[0].to_json()
    with pytest.raises(ValueError, match=r"u.jsonl:1: missing field 'label'"):
        labels_tensor(rows)


def test_group_index_first_appearance():
    assert group_index(["b", "a", "b", 3, "a"]) == [0, 1, 0, 2, 1]


def test_to_trajectory_worked_example():
    tok = char_tokenizer(ALPHABET)
    c = tok.convert_tokens_to_ids
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    rows = [parse_row(json.dumps({"prompt": "ab", "response": "x\ny\n", "label": 1}), "f:1"),
            parse_row(json.dumps({"prompt": "a", "response": "", "label": 0}), "f:2"),
            parse_row(json.dumps({"prompt": "ab", "response": "y", "label": 0, "group": "g"}), "f:3")]
    traj = to_trajectory(tok, rows, "newline")
    # prompts left-padded to P = 3 (BOS + 2 chars)
    assert traj.prompt_ids.tolist() == [[bos, c("a"), c("b")], [pad, bos, c("a")], [bos, c("a"), c("b")]]
    assert traj.prompt_mask.tolist() == [[True] * 3, [False, True, True], [True] * 3]
    # responses + EOS, right-padded to L = 5
    assert traj.response_ids.tolist() == [[c("x"), c("\n"), c("y"), c("\n"), eos],
                                          [eos, pad, pad, pad, pad],
                                          [c("y"), eos, pad, pad, pad]]
    assert traj.response_mask.tolist() == [[True] * 5, [True] + [False] * 4, [True, True] + [False] * 3]
    assert torch.equal(traj.loss_mask, traj.response_mask)
    # steps = lines; a line's newline belongs to it; EOS and padding are outside every step
    assert traj.step_ids.tolist() == [[0, 0, 1, 1, -1], [-1] * 5, [0, -1, -1, -1, -1]]
    assert traj.group_ids.tolist() == [0, 1, 2]                                # explicit group "g" != "ab"
    assert torch.equal(traj.behavior_logprobs, torch.zeros(3, 5))
    assert not traj.truncated.any()
    assert traj.examples == rows and traj.response_texts == ["x\ny\n", "", "y"]
    assert traj.prompt_texts == ["ab", "a", "ab"]


def test_to_trajectory_same_prompt_same_group():
    tok = char_tokenizer(ALPHABET)
    rows = [PRMRow("a", "x", 1.0, "a"), PRMRow("b", "x", 1.0, "b"), PRMRow("a", "y", 0.0, "a")]
    assert to_trajectory(tok, rows).group_ids.tolist() == [0, 1, 0]


def test_to_trajectory_bpe_response_has_no_bos_and_ends_with_eos():
    texts = ["Q: 12 +3\n", "12+3=15\nA: 15", "Q: 7 *2\n", "7*2=14\nA: 14"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    rows = [PRMRow("Q: 12 +3\n", "12+3=15\nA: 15", 1.0, "g"), PRMRow("Q: 7 *2\n", "7*2=14\nA: 15", 0.0, "g")]
    traj = to_trajectory(tok, rows, "newline")
    for b, row in enumerate(rows):
        n = int(traj.response_mask[b].sum())
        ids = traj.response_ids[b, :n].tolist()
        assert ids[-1] == tok.eos_token_id and tok.bos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == row.response
        p = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
        assert p[0] == tok.bos_token_id and tok.decode(p, skip_special_tokens=True) == row.prompt
        # two lines -> steps 0 and 1, EOS outside
        assert traj.step_ids[b, :n].tolist()[-1] == -1
        assert sorted(set(traj.step_ids[b, :n - 1].tolist())) == [0, 1]


class _NoBosTokenizer:
    """Stand-in tokenizer that adds no special token: an empty prompt encodes to nothing."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(ch) % 50 for ch in text]}


def test_empty_prompt_without_bos_is_rejected():
    with pytest.raises(ValueError, match=r"f.jsonl:4: the prompt has no token"):
        encode_row(_NoBosTokenizer(), PRMRow("", "x", 1.0, "", "f.jsonl:4"))
    p, r = encode_row(_NoBosTokenizer(), PRMRow("q", "xy", 1.0, "q"))
    assert len(p) == 1 and len(r) == 3 and r[-1] == 0


def test_labels_tensor_values():
    rows = [PRMRow("a", "x", 1.0, "a"), PRMRow("a", "y", 0.5, "a")]
    t = labels_tensor(rows)
    assert t.dtype == torch.float32 and t.tolist() == [1.0, 0.5]
    assert not math.isnan(t.sum())
