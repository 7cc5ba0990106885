"""Perplexity of the model a run holds, one way for every case, one result type.

``score`` gives ``{eval set: PerplexityResult}``: for a model held whole, each window through the
whole model (``perplexity``); for a streamed source (a model never whole in memory), block by block,
each block read from its files, run over every window, then freed (``perplexity_blockwise``). The
validate/test loops accumulate the same protocol in a metric, and ``metric_result`` turns it into the
same result. ``result_row`` is how every result is recorded in ``GPTQModule.results``.
"""

from __future__ import annotations

import time

from lightning.pytorch.utilities import rank_zero_info

from lightning_gptq.data.evaluation import PerplexityResult, _result, model_window_nll, perplexity, perplexity_blockwise
from lightning_gptq.driver import pinned_adapter
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.models.loading import resolve_dtype
from lightning_gptq.models.spill import SpillFolder
from lightning_gptq.nn import exact_kernels

from .metrics import ProtocolPerplexity
from .plan import spills_to_disk

__all__ = ["ScoringLoops", "metric_result", "result_row", "score"]


def score(source, dm, tokenizer, *, device, progress: bool, bos_token_id: int | None = None, adapter=None,
          store=None) -> dict[str, PerplexityResult]:
    """Perplexity of ``source.model`` on every set ``dm`` scores, under ``exact_kernels`` (quality,
    not this machine's fast paths: the same number on every CPU). A streamed source is scored block
    by block: only the embedding stage, the final stage and one block are in memory at a time, plus
    every window's hidden state (``store`` may move each to disk); everything read is freed again."""
    lm = source.model
    if not source.streams:
        with exact_kernels():
            return {name: perplexity(lm, dm.eval_tokens(name, tokenizer), seqlen=dm.eval_seqlen, dataset=name,
                                     max_windows=dm.eval_max_windows, progress=progress, bos_token_id=bos_token_id)
                    for name in dm.eval_datasets}
    adapter = adapter or pinned_adapter(lm)
    owner, attribute = adapter.blocks_location(lm)
    ends = [*(child for name, child in owner.named_children() if name != attribute), *adapter.final_modules(lm)]
    scores = {}
    try:
        for module in ends:
            source.fetch(module)
        for name in dm.eval_datasets:
            with exact_kernels():
                scores[name] = perplexity_blockwise(
                    lm, adapter, dm.eval_tokens(name, tokenizer), seqlen=dm.eval_seqlen, dataset=name,
                    max_windows=dm.eval_max_windows, device=device, progress=progress, store=store,
                    bos_token_id=bos_token_id, before_block=source.fetch, after_block=source.free)
    finally:
        for module in ends:
            source.free(module)
    return scores


def metric_result(metric, dm, name: str, seconds: float = 0.0) -> PerplexityResult:
    """The result a validate/test loop's ``ProtocolPerplexity`` accumulated on eval set ``name``."""
    tokens = int(metric.tokens)
    windows, total = tokens // dm.eval_seqlen, dm.eval_windows(name)[1]
    return _result(float(metric.nll_sum), windows, total, dm.eval_seqlen, int(dm.eval_tokens(name).numel()), name,
                   "lightning loop", seconds, bos=metric.bos)


def result_row(result: PerplexityResult) -> dict:
    """What ``GPTQModule.results`` keeps of a result."""
    return {"ppl": result.ppl, "tokens": result.n_tokens, "seqlen": result.seqlen, "windows": result.nsamples,
            "total_windows": result.total_windows, "protocol": result.protocol, "text": str(result)}


class ScoringLoops:
    """``GPTQModule``'s scoring: ``_score`` (fit's ``eval_before``/``eval_after``) and the
    ``validate``/``test`` loops, which feed every window through a ``ProtocolPerplexity`` metric (or,
    for a streamed source, score block by block when the loop starts). Every result is recorded with
    ``result_row`` under ``results[label][set]``; latency is measured after a loop when enabled."""

    def _score(self, label: str, source) -> dict:
        """Score ``source``'s model on every eval set; log and return ``{set: result_row}``."""
        dm, start = self.trainer.datamodule, time.perf_counter()
        if not source.streams:
            self._place()
        results = score(source, dm, self.tokenizer, device=self.device, progress=self.trainer.progress_bar_callback
                        is not None, bos_token_id=self._eval_bos(dm), store=self._scoring_store(source),
                        adapter=self.driver.adapter if self.driver is not None and source.model is self.lm else None)
        self.timings[label] += time.perf_counter() - start
        for name, result in results.items():
            rank_zero_info(f"{label}: {result}")
            for logger in self.loggers:
                logger.log_metrics({f"{label}/ppl/{name}": result.ppl})
        return {name: result_row(result) for name, result in results.items()}

    def _scoring_store(self, source):
        """Block-by-block scoring keeps every window's hidden state where the activation cache would go."""
        if not source.streams or self.device.type != "cpu":
            return None
        dm, lm = self.trainer.datamodule, source.model
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        windows = max(dm.eval_windows(name, self.tokenizer)[0].shape[0] for name in dm.eval_datasets)
        hidden = windows * dm.eval_seqlen * int(config.hidden_size) * resolve_dtype(self.hparams.dtype).itemsize
        if not spills_to_disk(self.hparams.activation_storage, hidden):
            return None
        rank_zero_info(f"scoring: every window's hidden state kept in files under {self._activation_folder()}")
        return SpillFolder(self._activation_folder()).put

    def _eval_bos(self, dm) -> int | None:
        """The token put before every evaluation window (``data.eval_bos``), else None."""
        return dm.eval_bos_token_id(self.tokenizer) if getattr(dm, "eval_bos", False) else None

    def _eval_start(self, prefix: str) -> None:
        if self.source.streams:  # block by block now; the loop's steps have nothing left to do
            self._streamed_scores = self._score(prefix, self.source)
            return
        self._place().eval()
        self._val_ppl = [ProtocolPerplexity(bos=self._eval_bos(self.trainer.datamodule) is not None).to(self.device)
                         for _ in self.trainer.datamodule.eval_datasets]

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        if self.source.streams:
            return
        ids = batch["input_ids"].to(self.device)
        with exact_kernels():  # perplexity does not depend on which fast paths a CPU has
            nll = model_window_nll(self.lm, ids, bos_token_id=self._eval_bos(self.trainer.datamodule))
        self._val_ppl[dataloader_idx].update_nll(nll, ids)

    def _eval_end(self, prefix: str) -> None:
        dm = self.trainer.datamodule
        rows = self._streamed_scores if self.source.streams else {}
        for name, metric in ([] if self.source.streams else zip(dm.eval_datasets, self._val_ppl)):
            result = metric_result(metric, dm, name)
            rank_zero_info(f"{prefix}: {result}")
            rows[name] = result_row(result)
            metric.reset()
        for name, row in rows.items():
            self.log(f"{prefix}/ppl/{name}", row["ppl"], add_dataloader_idx=False)
        self.results[prefix] = dict(rows)
        if self.hparams.latency:
            lat = measure_latency(self.lm, prompt_tokens=self.hparams.latency_prompt_tokens,
                                  decode_tokens=self.hparams.latency_decode_tokens, decode=self.hparams.latency_decode)
            self.log(f"{prefix}/latency/prefill_tokens_per_s", lat.prefill_tokens_per_s)
            self.log(f"{prefix}/latency/decode_ms_per_token", lat.decode_ms_per_token)
            rank_zero_info(f"{prefix} latency: {lat}")
            self.results[prefix]["latency"] = lat.to_dict()

    def on_validation_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
