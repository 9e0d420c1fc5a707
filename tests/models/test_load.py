"""Save/load round trips of the locally built tokenizers and tiny models (no network)."""

import torch
import pytest

from finegrain.models.load import load_pretrained
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer

TEXT = "Q: 13 *2 +9\n13*2=26\n26+9=35\nA: 35"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_roundtrip_keeps_tokens_and_logits(tmp_path, family, kind):
    tok = char_tokenizer(sorted(set(TEXT))) if kind == "char" else train_bpe_tokenizer([TEXT] * 50, vocab_size=300)
    model = tiny_causal_lm(tok, family=family, size="micro", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = load_pretrained(str(tmp_path), device="cpu")
    ids = tok(TEXT)["input_ids"]
    # the family's own tokenizer class would drop spaces and newlines: the ids must be identical
    assert tok2(TEXT)["input_ids"] == ids
    assert tok2.decode(ids, skip_special_tokens=True) == TEXT
    assert ids[0] == tok2.bos_token_id and tok2.pad_token_id is not None
    x = torch.tensor([ids])
    torch.testing.assert_close(model2(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)


def test_missing_model_path_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_pretrained("no_such_dir")
