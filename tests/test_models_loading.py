"""load_causal_lm: local folders, dtype, and fast clear failures (hub unreachable, missing paths)."""

import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_gptq import _hub
from lightning_gptq.models.loading import ModelLoadError, load_causal_lm, resolve_dtype
from tiny_models import FACTORIES


@pytest.fixture
def tiny_folder(tmp_path):
    """A saved tiny Llama with a word-level tokenizer: a local model folder like a downloaded one."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(50)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "tiny-llama"
    FACTORIES["llama"]().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_loads_a_local_folder_in_eval_mode(tiny_folder):
    model, tokenizer = load_causal_lm(str(tiny_folder))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer("w1 w2").input_ids[-2:] == [4, 5]
    reference = FACTORIES["llama"]()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    half, _ = load_causal_lm(str(tiny_folder), dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int3")


def test_hub_id_offline_fails_fast_with_one_clear_message():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as raised:
        load_causal_lm("facebook/opt-125m")
    assert time.perf_counter() - start < 30  # a retry loop takes minutes; 30 s tolerates a loaded machine
    message = str(raised.value)
    assert "facebook/opt-125m" in message and "unreachable" in message
    assert "gguf_file=" in message and "folder" in message
    assert isinstance(raised.value, RuntimeError) and raised.value.__cause__ is not None


def test_hub_id_with_unreachable_network_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_hub, "hub_endpoint", lambda: "https://127.0.0.1:9")
    monkeypatch.setattr(_hub, "_probe_cache", {})
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_causal_lm("facebook/opt-125m")
    assert time.perf_counter() - start < 30  # a retry loop takes minutes; 30 s tolerates a loaded machine


@pytest.mark.parametrize(
    ("model", "gguf_file"),
    [("/no/such/folder", None), ("./missing-model-dir", None), ("/no/such/model.gguf", None)],
)
def test_missing_local_paths(model, gguf_file):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(model, gguf_file=gguf_file)


def test_missing_gguf_file_in_existing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_causal_lm(str(tmp_path), gguf_file="absent.gguf")
