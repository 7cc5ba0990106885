"""Calibration windows, evaluation texts, tokenization cache, perplexity, and offline failures."""

import gzip
import json
import math
import random
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_gptq import _hub
from lightning_gptq.data.calibration import calibration_windows, text_windows
from lightning_gptq.data.evaluation import (
    with_bos,
    PerplexityResult,
    eval_tokens,
    perplexity,
    perplexity_blockwise,
    window_nll,
)
from lightning_gptq.data.text import (
    CalibrationDataError,
    DatasetUnavailableError,
    document_windows,
    read_documents,
)
from lightning_gptq.models.adapters import get_adapter
from tiny_models import FACTORIES, VOCAB


class CharTokenizer:
    """Character-level stand-in for a HF tokenizer: id = 3 + ord(c) % 90, BOS 1 first; records calls."""

    name_or_path = "char-tokenizer"

    def __init__(self, add_bos: bool = True, salt: int = 0):
        self.add_bos = add_bos
        self.salt = salt
        self.calls: list[str] = []

    def get_vocab(self):
        return {"<bos>": 1, "salt": self.salt, "bos": self.add_bos}

    def encode(self, text: str) -> list[int]:
        return ([1] if self.add_bos else []) + [3 + ord(c) % 90 for c in text]

    def __call__(self, text, return_tensors=None, verbose=True):
        self.calls.append(text)
        return SimpleNamespace(input_ids=torch.tensor([self.encode(text)]))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_GPTQ_CACHE", str(tmp_path / "cache"))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -- calibration windows ---------------------------------------------------------------------------

def test_text_windows_follow_the_reference_rule():
    ids = torch.arange(1000)
    windows = text_windows(ids, nsamples=7, seqlen=50, seed=3)
    # The reference: random.seed(seed); per sample i = random.randint(0, numel - seqlen - 1); ids[i:i+seqlen].
    state = random.getstate()
    random.seed(3)
    starts = [random.randint(0, 1000 - 50 - 1) for _ in range(7)]
    assert torch.equal(windows, torch.stack([torch.arange(s, s + 50) for s in starts]))
    random.setstate(state)
    assert windows.dtype == torch.long and windows.shape == (7, 50)
    assert torch.equal(text_windows(ids, nsamples=7, seqlen=50, seed=3), windows)
    assert not torch.equal(text_windows(ids, nsamples=7, seqlen=50, seed=4), windows)
    # The smallest legal stream has exactly one start position.
    assert torch.equal(text_windows(torch.arange(51), nsamples=1, seqlen=50, seed=0), torch.arange(50).unsqueeze(0))


def test_python_global_random_state_is_untouched(tmp_path):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    calibration_windows(str(_write(tmp_path / "a.txt", "x" * 300)), CharTokenizer(), nsamples=3, seqlen=20)
    assert random.random() == expected


def test_local_file_joining_rule(tmp_path):
    # Documents are separated by blank lines (also whitespace-only ones, CRLF endings); joined "\n\n".
    raw = "first doc line one\r\nline two\r\n\r\nsecond doc\n   \n\n\nthird doc\n"
    path = _write(tmp_path / "docs.txt", raw)
    tokenizer = CharTokenizer()
    windows = calibration_windows(str(path), tokenizer, nsamples=4, seqlen=10, seed=0)
    joined = "first doc line one\nline two\n\nsecond doc\n\nthird doc"
    assert tokenizer.calls == [joined]
    assert torch.equal(windows, text_windows(torch.tensor(tokenizer.encode(joined)), nsamples=4, seqlen=10, seed=0))


def test_local_folder_reads_txt_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write(folder / "b.txt", "bravo doc")
    _write(folder / "a.txt", "alpha doc\n\nalpha two\n")
    _write(folder / "notes.md", "ignored")
    tokenizer = CharTokenizer()
    calibration_windows(str(folder), tokenizer, nsamples=1, seqlen=5)
    assert tokenizer.calls == ["alpha doc\n\nalpha two\n\nbravo doc"]


def test_tokenized_text_is_cached_on_disk(tmp_path):
    path = _write(tmp_path / "t.txt", "some calibration text " * 20)
    tokenizer = CharTokenizer()
    first = calibration_windows(str(path), tokenizer, nsamples=5, seqlen=30, seed=1)
    assert len(tokenizer.calls) == 1
    second = calibration_windows(str(path), tokenizer, nsamples=5, seqlen=30, seed=1)
    assert len(tokenizer.calls) == 1, "second call must read the cache, not tokenize"
    assert torch.equal(first, second)
    calibration_windows(str(path), tokenizer, nsamples=2, seqlen=10, seed=9)  # other windows, same text
    assert len(tokenizer.calls) == 1
    other_tokenizer = CharTokenizer(salt=1)  # another vocab: its own cache entry
    calibration_windows(str(path), other_tokenizer, nsamples=5, seqlen=30, seed=1)
    assert len(other_tokenizer.calls) == 1
    _write(tmp_path / "t.txt", "changed text " * 20)
    calibration_windows(str(path), tokenizer, nsamples=5, seqlen=30, seed=1)
    assert len(tokenizer.calls) == 2
    assert list((tmp_path / "cache" / "tokens").glob("*.pt"))


def test_json_lines_file_uses_the_c4_document_rule(tmp_path):
    docs = ["short", "a" * 40 + "b" * 40, "tiny", "c" * 100, "d" * 19]
    path = tmp_path / "shard.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc, "url": "x"}) + "\n")
    tokenizer = CharTokenizer(add_bos=False)
    windows = calibration_windows(str(path), tokenizer, nsamples=6, seqlen=20, seed=5)
    # The reference: random.seed(seed); per sample draw documents with randint(0, len(docs) - 1) until
    # one tokenizes to more than seqlen tokens, then start = randint(0, len - seqlen - 1).
    rng = random.Random(5)
    expected = []
    for _ in range(6):
        while True:
            ids = tokenizer.encode(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > 20:
                break
        start = rng.randint(0, len(ids) - 20 - 1)
        expected.append(ids[start : start + 20])
    assert windows.tolist() == expected
    calls = len(tokenizer.calls)
    assert torch.equal(calibration_windows(str(path), tokenizer, nsamples=6, seqlen=20, seed=5), windows)
    assert len(tokenizer.calls) == calls  # cached


def test_document_windows_exact_length_rule():
    tokenizer = CharTokenizer(add_bos=False)
    exact = document_windows(["q" * 8], tokenizer, nsamples=2, seqlen=8, seed=0, allow_exact_length=True)
    assert exact.tolist() == [tokenizer.encode("q" * 8)] * 2
    with pytest.raises(CalibrationDataError, match="too short"):
        document_windows(["q" * 8], tokenizer, nsamples=1, seqlen=8, seed=0, allow_exact_length=False)


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("plenty of text here " * 10, dict(nsamples=0), "nsamples"),
        ("plenty of text here " * 10, dict(nsamples=-3), "nsamples"),
        ("plenty of text here " * 10, dict(seqlen=0), "seqlen"),
        ("\n\n  \n", dict(), "no text"),
        ("too short", dict(seqlen=20), "at least 21"),
    ],
)
def test_bad_calibration_inputs_raise(tmp_path, text, kwargs, match):
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(CalibrationDataError, match=match):
        calibration_windows(str(path), CharTokenizer(), **{"nsamples": 2, "seqlen": 8, **kwargs})


def test_unknown_calibration_source_raises():
    with pytest.raises(CalibrationDataError, match="Unknown calibration source"):
        calibration_windows("no-such-source-or-file", CharTokenizer())
    assert issubclass(CalibrationDataError, ValueError)


# -- evaluation texts ------------------------------------------------------------------------------

def test_eval_tokens_local_joining_rules(tmp_path):
    tokenizer = CharTokenizer()
    wiki = _write(tmp_path / "wiki.test.raw", " = Title = \n Body line . \n = = Section = = \n")
    tokens = eval_tokens("wikitext2", tokenizer, path=str(wiki))
    assert tokenizer.calls[-1] == " = Title = \n Body line . \n = = Section = = "
    assert tokens.shape == (1, len(tokenizer.encode(tokenizer.calls[-1]))) and tokens.dtype == torch.long

    ptb = _write(tmp_path / "ptb.txt", " no it was n't black monday \n but while the N points \n")
    eval_tokens("ptb", tokenizer, path=str(ptb))
    assert tokenizer.calls[-1] == "no it was n't black monday\n\nbut while the N points"
    eval_tokens("ptb-new", tokenizer, path=str(ptb))
    assert tokenizer.calls[-1] == "no it was n't black monday but while the N points"


def test_eval_tokens_local_c4_rules(tmp_path):
    docs = [f"document {i} " + "w" * (i % 7) * 5 for i in range(1200)]
    path = tmp_path / "c4-validation.json"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tokenizer = CharTokenizer()
    c4_new = eval_tokens("c4-new", tokenizer, path=str(path), seqlen=4)
    assert tokenizer.calls[-1] == " ".join(docs[:1100])  # first 1,100 documents joined with " "
    assert torch.equal(c4_new[0], torch.tensor(tokenizer.encode(tokenizer.calls[-1])[: 256 * 4]))

    c4 = eval_tokens("c4", tokenizer, path=str(path), seqlen=30)
    assert c4.shape == (1, 256 * 30)
    # 256 windows, seed 0, documents of at least seqlen tokens, start randint(0, len - seqlen - 1).
    expected = document_windows(docs, CharTokenizer(), nsamples=256, seqlen=30, seed=0, allow_exact_length=True)
    assert torch.equal(c4, expected.reshape(1, -1))


def test_eval_tokens_rejects_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="Unknown evaluation dataset"):
        eval_tokens("lambada", CharTokenizer())
    with pytest.raises(FileNotFoundError):
        eval_tokens("wikitext2", CharTokenizer(), path=str(tmp_path / "missing.raw"))


def test_read_documents_json_and_txt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_documents(path) == ["one", "two"]


# -- hub unreachable -------------------------------------------------------------------------------

HUB_CALLS = [
    ("eval wikitext2", lambda: eval_tokens("wikitext2", CharTokenizer()),
     "--data.eval_paths='{wikitext2: ../shared/data/wikitext-2-raw/wiki.test.raw}' on the command line, eval_tokens("),
    ("eval ptb", lambda: eval_tokens("ptb", CharTokenizer()), "ptb.valid.txt"),
    ("eval c4", lambda: eval_tokens("c4", CharTokenizer()), "--data.eval_paths='{c4: /path/to/c4-validation"),
    ("calibration c4", lambda: calibration_windows("c4", CharTokenizer()), "wikipedia-vital-leads.txt"),
    ("calibration wikitext2", lambda: calibration_windows("wikitext2", CharTokenizer()), "calibration_windows("),
]


@pytest.mark.parametrize(("label", "call", "hint"), HUB_CALLS, ids=[c[0] for c in HUB_CALLS])
def test_offline_hub_fails_fast_with_local_hint(label, call, hint):
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as raised:
        call()
    assert time.perf_counter() - start < 30  # a retry loop takes minutes; 30 s tolerates a loaded machine
    message = str(raised.value)
    assert message.startswith("Could not load") and hint in message
    assert raised.value.__cause__ is not None  # chained, but ours is the top message
    assert isinstance(raised.value, RuntimeError)


def test_unreachable_hub_without_offline_mode_fails_fast(monkeypatch):
    """No HF_HUB_OFFLINE, but nothing answers: the probe must stop the libraries' retry loops."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_hub, "hub_endpoint", lambda: "https://127.0.0.1:9")  # closed port
    monkeypatch.setattr(_hub, "_probe_cache", {})
    assert not _hub.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="unreachable"):
        eval_tokens("wikitext2", CharTokenizer())
    assert time.perf_counter() - start < 30  # a retry loop takes minutes; 30 s tolerates a loaded machine
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored


# -- perplexity ------------------------------------------------------------------------------------

def test_window_nll_is_mean_shifted_cross_entropy_times_seqlen():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 17)
    ids = torch.randint(0, 17, (3, 10))
    expected = torch.stack([F.cross_entropy(logits[b, :-1], ids[b, 1:]) * 10 for b in range(3)])
    assert torch.allclose(window_nll(logits, ids), expected, atol=1e-6)
    assert window_nll(logits.double(), ids).dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bloom"])
def test_whole_model_and_blockwise_perplexity_agree(arch):
    model = FACTORIES[arch]()
    tokens = torch.randint(3, VOCAB, (1, 5 * 16 + 7), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, tokens, seqlen=16, dataset="random", progress=False)
    blockwise = perplexity_blockwise(model, get_adapter(model), tokens, seqlen=16, dataset="random", progress=False)
    assert whole.nsamples == blockwise.nsamples == 5 and whole.n_tokens == 80 and whole.text_tokens == 87
    assert whole.nll_sum == pytest.approx(blockwise.nll_sum, rel=1e-6)
    # By hand: exp(sum over windows of mean shifted CE * seqlen / (nsamples * seqlen)).
    with torch.no_grad():
        windows = tokens[0, :80].view(5, 16)
        logits = model(windows).logits
    by_hand = math.exp(sum(float(F.cross_entropy(logits[i, :-1], windows[i, 1:])) * 16 for i in range(5)) / 80)
    assert whole.ppl == pytest.approx(by_hand, rel=1e-5)
    assert 20 < whole.ppl < 500  # a random-init model is near-uniform over the 96-token vocabulary
    assert not model.training


def test_per_window_bos_protocol_scores_every_token_after_bos():
    """``bos_token_id``: each window is fed as [BOS, t0 .. t(L-2)] and all L tokens are scored (by hand
    below); whole-model, blockwise and the validate loop's metric agree, and the result is labelled."""
    from lightning_gptq.lightning.metrics import ProtocolPerplexity

    model = FACTORIES["llama"]()
    tokens = torch.randint(3, VOCAB, (1, 3 * 16 + 5), generator=torch.Generator().manual_seed(2))
    whole = perplexity(model, tokens, seqlen=16, dataset="random", progress=False, bos_token_id=1)
    blockwise = perplexity_blockwise(model, get_adapter(model), tokens, seqlen=16, progress=False, bos_token_id=1)
    windows = tokens[0, :48].view(3, 16)
    with torch.no_grad():
        logits = model(torch.cat([torch.ones(3, 1, dtype=torch.long), windows[:, :-1]], dim=1)).logits
    by_hand = math.exp(sum(float(F.cross_entropy(logits[i], windows[i])) * 16 for i in range(3)) / 48)
    assert whole.ppl == pytest.approx(by_hand, rel=1e-5)
    assert blockwise.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6)
    metric = ProtocolPerplexity(bos=True)
    with torch.no_grad():
        metric.update(model(with_bos(windows, 1)).logits, windows)
    assert float(metric.compute()) == pytest.approx(by_hand, rel=1e-5)
    assert whole.protocol == "gptq-paper+bos" and "BOS put before each window" in str(whole)
    plain = perplexity(model, tokens, seqlen=16, progress=False)
    assert plain.nll_sum != pytest.approx(whole.nll_sum, rel=1e-6) and "no per-window BOS" in str(plain)


def test_max_windows_is_reported():
    model = FACTORIES["llama"]()
    tokens = torch.randint(3, VOCAB, (1, 64))
    partial = perplexity(model, tokens, seqlen=16, dataset="wikitext2", max_windows=2, progress=False)
    assert partial.nsamples == 2 and partial.total_windows == 4 and partial.partial
    text = str(partial)
    assert "first 2 of 4 windows" in text and "PARTIAL" in text and "first-2-of-4" in partial.protocol
    full = perplexity_blockwise(model, get_adapter(model), tokens, seqlen=16, dataset="wikitext2", progress=False)
    text = str(full)
    assert not full.partial and full.protocol == "gptq-paper"
    for part in ("wikitext2", "gptq-paper", "seqlen 16", "64 of 64 tokens", "4 windows", "blockwise"):
        assert part in text
    assert isinstance(full, PerplexityResult)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[:, :10], seqlen=16, progress=False)


def test_mixed_calibration_draws_each_source_in_its_share(tmp_path):
    from lightning_gptq.data import mixed_calibration_windows
    from tiny_lm import char_tokenizer

    tokenizer = char_tokenizer()
    (tmp_path / "a.txt").write_text("aaaa bbbb. " * 400)
    (tmp_path / "z.txt").write_text("zzzz yyyy. " * 400)
    a, z = str(tmp_path / "a.txt"), str(tmp_path / "z.txt")
    windows = mixed_calibration_windows({a: 3, z: 1}, tokenizer, nsamples=8, seqlen=16, seed=0)
    assert windows.shape == (8, 16)
    z_id = tokenizer.convert_tokens_to_ids("z")
    from_z = [bool((w == z_id).any()) for w in windows]
    assert sum(from_z) == 2 and from_z != sorted(from_z, reverse=True)  # 1/4 of 8, shuffled among the rest
    assert torch.equal(windows, mixed_calibration_windows({a: 3, z: 1}, tokenizer, nsamples=8, seqlen=16, seed=0))
    with pytest.raises(CalibrationDataError, match="positive"):
        mixed_calibration_windows({a: 1, z: 0}, tokenizer, nsamples=8, seqlen=16)
    with pytest.raises(CalibrationDataError, match="too few"):
        mixed_calibration_windows({a: 100, z: 1}, tokenizer, nsamples=4, seqlen=16)


@pytest.mark.parametrize("arch", sorted(__import__("tiny_models").FACTORIES))
def test_scoring_a_slice_of_positions_at_a_time_gives_the_whole_windows_numbers(arch, monkeypatch):
    """``model_window_nll`` (whole-model scoring: ``perplexity``, the validate loop) and the blockwise final stage run
    the LM head on a few positions at a time instead of holding ``[b, seqlen, vocab]`` logits; each position's logits
    are computed on their own either way, so the protocol terms are the same to fp32 rounding (a BLAS may order a
    short product's sums otherwise: here 2 of 18 models differ in the last bit at 5 rows a slice), Granite's, Cohere's
    and Gemma-3's logit scaling and soft-capping included."""
    from lightning_gptq.data import evaluation
    from tiny_models import FACTORIES, token_ids

    model = FACTORIES[arch]()
    ids, vocab = token_ids(n=2, seqlen=16), model.get_output_embeddings().out_features
    monkeypatch.setattr(evaluation, "LOGITS_SLICE_BYTES", 4 * vocab * 2 * 5)  # 5 positions of both windows a slice
    rows, terms = [], {}
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    for bos in (None, 1):
        with torch.no_grad():
            whole = window_nll(model(input_ids=with_bos(ids, bos), use_cache=False).logits, ids, bos=bos is not None)
        rows.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no fallback to the whole logits)
            sliced = evaluation.model_window_nll(model, ids, bos_token_id=bos)
        assert rows == [16, 1, 5, 5, 5, 1], rows  # the forward (its head call cut to the last position), the check, slices
        assert torch.allclose(sliced, whole, rtol=2e-7, atol=0), (bos, sliced - whole)
        terms[bos] = whole
    tokens = ids.reshape(1, -1)
    full = evaluation.perplexity(model, tokens, seqlen=16, progress=False)
    assert full.ppl == pytest.approx(math.exp(sum(float(t) for t in terms[None]) / ids.numel()), rel=1e-6)
    blockwise = evaluation.perplexity_blockwise(model, get_adapter(model), tokens, seqlen=16, progress=False)
    assert abs(blockwise.ppl - full.ppl) <= 1e-6 * full.ppl  # (blocks run alone: fp32 sums in another order)


def test_a_head_whose_logits_are_not_what_we_make_of_them_is_scored_from_the_whole_logits():
    """A config field the model's forward does not apply (here soft-capping on LLaMA) makes the one-position check
    fail: the window is scored from the model's own whole logits, with one warning."""
    from lightning_gptq.data import evaluation
    from tiny_models import FACTORIES, token_ids

    model = FACTORIES["llama"]()
    model.config.final_logit_softcapping = 0.5
    ids = token_ids(n=1, seqlen=16)
    with torch.no_grad():
        whole = window_nll(model(input_ids=ids, use_cache=False).logits, ids)
    evaluation._FULL_LOGITS_WARNED.clear()
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    with pytest.warns(UserWarning, match="scored from each window's whole logits"):
        assert torch.equal(evaluation.model_window_nll(model, ids), whole)
    assert len(forwards) == 2  # the try, then the whole logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model type
        assert torch.equal(evaluation.model_window_nll(model, ids), whole)
    assert len(forwards) == 3  # this model's later windows: one forward
    other = FACTORIES["llama"]()  # another instance of the type is tried again (and passes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluation.model_window_nll(other, ids)
    bypassed = FACTORIES["llama"]()  # a forward that never calls the module get_output_embeddings() names
    bypassed.get_output_embeddings = lambda: torch.nn.Linear(8, 8)
    with torch.no_grad():
        whole = window_nll(bypassed(input_ids=ids, use_cache=False).logits, ids)
    evaluation._FULL_LOGITS_WARNED.clear()
    with pytest.warns(UserWarning, match="does not call the LM head once"):
        assert torch.equal(evaluation.model_window_nll(bypassed, ids), whole)
