"""SFT on tool-use traces: the environment's observations are context, never targets."""

from finegrain.models.tokenizer import char_tokenizer
from finegrain.train.sft import encode_pairs


def test_observation_spans_are_not_trained_on():
    tok = char_tokenizer(list("abcdefghijklmnopqrstuvwxyz<>/()=:?, \n0123456789"))
    sol = "x<call>f(a)</call>\n<result>b</result>\nA: b"
    obs = (sol.index("\n<result>"), sol.index("</result>") + len("</result>\n"))
    ids, am, tm = encode_pairs(tok, ["Q?"], [sol], [[obs]])
    P = len(tok("Q?", add_special_tokens=True)["input_ids"])
    n_sol = len(sol)  # one token per character
    assert am[0].sum() == P + n_sol + 1
    trained = tm[0, P:P + n_sol].tolist()
    assert trained == [not (obs[0] <= k < obs[1]) for k in range(n_sol)]
    assert tm[0, P + n_sol] and not tm[0, :P].any()  # EOS trained, prompt not
    plain_ids, _, plain_tm = encode_pairs(tok, ["Q?"], [sol])
    assert plain_ids.equal(ids) and plain_tm[0, P:P + n_sol].all()  # without spans: every solution token
