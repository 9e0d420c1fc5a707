"""Tokenizers trained or built locally, saved and loaded as Hugging Face tokenizers.

* ``char_tokenizer(alphabet)``: one token per character (tiny demo models).
* ``train_bpe_tokenizer(texts, vocab_size)``: byte-level BPE trained with ``tokenizers`` on local
  text, the same kind of tokenizer real models use (tests run the real-model path with it).
Both carry ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` and prepend ``<bos>`` when encoding.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def char_tokenizer(alphabet: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` (unknown characters map to ``<unk>``).

    >>> tok = char_tokenizer("0123456789+=\\n")
    >>> tok("1+1=2")["input_ids"][:3] == [tok.bos_token_id, tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("+")]
    True
    >>> tok.decode(tok("1+1=2\\n")["input_ids"], skip_special_tokens=True)
    '1+1=2\\n'
    """
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in dict.fromkeys(alphabet):
        if c not in vocab:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` locally (no download)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)
