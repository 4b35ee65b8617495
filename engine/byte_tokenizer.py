"""A byte-level tokenizer that transformers' AutoTokenizer loads from a directory.

Token ids 0..2 are <pad>, <s>, </s>; ids 3..258 are the 256 bytes. Used by the built-in demo
model and by the tiny test models, so everything loads offline with the real HF code path.
"""

from __future__ import annotations

from pathlib import Path

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def save_byte_tokenizer(directory: str | Path, *, chat_template: str | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json for a byte-level tokenizer into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bytes_to_unicode = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins
    # Order the byte symbols by the byte they stand for so id = byte + BYTE_OFFSET.
    table = _byte_level_table()
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    for b in range(256):
        vocab[table[b]] = b + BYTE_OFFSET
    assert len(bytes_to_unicode) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))


def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable unicode mapping (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
