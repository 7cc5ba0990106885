"""Tiny causal LMs saved as real HF folders (model + character tokenizer), for end-to-end runs; and
``lightning_lines``, what Lightning's ``rank_zero_info`` logged during a block."""

import contextlib
import logging
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import FACTORIES, VOCAB

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION_TEXT = SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'\"()-\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (72 characters + 3 specials <= the tiny models' vocabulary of 96)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(_CHARS)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model_dir(root: Path, arch: str = "llama", **config) -> Path:
    """Save a tiny random ``arch`` model and the character tokenizer under ``root/arch``."""
    folder = root / arch
    if not (folder / "config.json").exists():
        FACTORIES[arch](**config).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    return folder


@contextlib.contextmanager
def lightning_lines():
    """The messages ``rank_zero_info``/``rank_zero_warn`` log inside the block, in a list (Lightning's logger does not
    reach pytest's ``caplog``)."""
    from lightning_utilities.core import rank_zero

    messages: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    rank_zero.log.addHandler(handler)
    try:
        yield messages
    finally:
        rank_zero.log.removeHandler(handler)
