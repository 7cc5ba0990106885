"""The run summary written after ``fit``: JSON for tools, Markdown for people, a per-layer loss plot."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

import lightning_gptq
from lightning_gptq.nn import QuantLinear, choices
from lightning_gptq.nn.autotune_cache import cpu_model


def _layer_table(records: list[dict]) -> list[str]:
    scaled = any(r.get("equalize_alpha") is not None for r in records)  # gptq.equalize: the exponent each kept
    lines = ["| layer | shape | loss | damp | retries | samples | s |" + (" α |" if scaled else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if scaled else "")]
    for r in records:
        alpha = r.get("equalize_alpha")
        lines.append(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['loss']:.4g} | {r['damp']:g} | "
                     f"{r['damp_retries']} | {r['nsamples']} | {r['seconds']:.3f} |"
                     + (f" {'–' if alpha is None else f'{alpha:g}'} |" if scaled else ""))
    return lines


def _plot(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        kind = r["name"].split(".", 3)[-1] if r["name"].count(".") >= 3 else r["name"]
        xs, ys = series.setdefault(kind, ([], []))
        xs.append(r["block"])
        ys.append(max(r["loss"], 1e-12))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("GPTQ loss  Σ(w−q)²/U[j,j]²/2")
    ax.set_title("per-layer quantization loss")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _describe_weight(hessian: dict) -> str:
    where = " (attention in-projections only)" if hessian.get("sink_layers") == "attention" else ""
    if hessian["sink_weight"] != "attention":
        return f"{hessian['sink_weight']:g}{where}"
    weights = list(hessian.get("block_weights", {}).values())
    span = f", {min(weights):.1f}–{max(weights):.1f} over the blocks" if weights else ""
    return f"the attention they receive{span}{where}"


def write_summary(module, folder: Path | None, report: dict) -> dict:
    """The run summary (the dict ``summary.json`` holds), written to ``folder`` as ``summary.json`` and ``summary.md``
    (plus ``layer_loss.png`` when matplotlib is there) and the paths logged; ``folder`` None: nothing written.
    ``report``: the callbacks' merged ``report()`` (method, quant, layers, hessian)."""
    method, quant = report["method"], report["quant"]
    capture = report.get("hessian")
    hessian = ({"sink_tokens": capture["sink_tokens"], "sink_weight": capture["sink_weight"]}
               if capture is not None and method == "gptq" else None)  # RTN reads no Hessian
    if hessian is not None and (capture["sink_layers"] != "all" or capture["measured"]):
        hessian.update(sink_layers=capture["sink_layers"], block_weights=dict(capture["block_weights"]))
        if capture["measured"]:
            hessian["sink_probe_windows"] = capture["sink_probe_windows"]
    dm = module.trainer.datamodule
    records = report.get("layers", [])
    layers = [m for m in module.lm.modules()  # streamed blocks were written out and freed (meta): not counted
              if isinstance(m, QuantLinear) and all(b.device.type != "meta" for b in m.buffers())]
    # saving moved the model to the CPU: its layers computed, and had their kernels chosen, on the module's device
    specs = {dataclasses.replace(m.spec(), device=module.device.type) for m in layers}
    kernels = [c for c in choices() if c.spec in specs]
    backends = {b: sum(m.backend == b for m in layers) for b in sorted({m.backend for m in layers})}
    refusals = report.get("vllm_refusals")  # why vLLM would not load the folder (checkpoint/serving.py)
    data = {
        "tool": {"name": "lightning-gptq", "version": lightning_gptq.__version__, "torch": torch.__version__,
                 "python": platform.python_version(), "threads": torch.get_num_threads(),
                 "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": dict(module.hparams),
        "quant": quant.to_dict(),
        "dynamic": report.get("dynamic") or {},
        "equalize": report.get("equalize") or [],
        "equalize_layers": report.get("equalize_layers"),
        "equalize_refused": report.get("equalize_refused") or [],
        "method": method,
        "hessian": hessian,
        "calibration": {"source": dm.calibration, "nsamples": dm.nsamples, "seqlen": dm.seqlen, "seed": dm.seed,
                        "bos": getattr(dm, "calibration_bos", False),
                        "pass_dtype": str(getattr(module.driver, "compute_dtype", None)
                                          or module.hparams.dtype).removeprefix("torch.")},
        "timings_s": dict(module.timings),
        "peak_memory": module.peak_memory(),
        "results": module.results,
        "serving": {"vllm": "not checked" if refusals is None else refusals or "serves"},
        "quantized_linear": {"layers_per_backend": backends, "choices": [c.to_dict() for c in kernels]},
        "layers": records,
    }
    text = json.dumps(data, indent=2, default=str)
    if folder is None:
        return json.loads(text)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "summary.json", folder / "summary.md"
    json_path.write_text(text)
    lines = [
        f"# lightning-gptq run: {module.hparams.model}",
        "",
        f"- method: **{method}**, {quant}" + (f"; per-layer rules (dynamic): {data['dynamic']}" if data["dynamic"] else "")
        + (f"; input scaling, exponents tried: {[0.0, *data['equalize']]}" if data["equalize"] else "")
        + (f" on layers matching `{data['equalize_layers']}`" if data["equalize"] and data["equalize_layers"] else "")
        + (f" (refused, not an equivalent rewrite: {data['equalize_refused']})" if data["equalize_refused"] else ""),
        f"- calibration: {dm.nsamples} × {dm.seqlen} tokens from `{dm.calibration}` (seed {dm.seed}),"
        f" true-sequential: {module.hparams.true_sequential}, passes in {data['calibration']['pass_dtype']}"
        + (f", Hessian weight of the first {hessian['sink_tokens']} position(s): {_describe_weight(hessian)}"
           if hessian else ""),
        f"- peak memory: {', '.join(f'{k} {v:.0f}' for k, v in data['peak_memory'].items())}",
        f"- vLLM: {'would not load it: ' + '; '.join(refusals) if refusals else data['serving']['vllm']}",
        "",
        "## Time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in module.timings.items()],
        "",
        "## Perplexity",
        "",
    ]
    for when in ("before", "after"):
        for name, r in module.results.get(when, {}).items():
            lines.append(f"- {when}: {r['text']}")
    if "latency" in module.results:
        lat = module.results["latency"]
        lines += ["", "## Latency", "", f"- prefill {lat['prefill_tokens_per_s']:.1f} tokens/s "
                  f"({lat['prompt_tokens']}-token prompt), decode {lat['decode_ms_per_token']:.2f} ms/token "
                  f"({lat['decode_tokens']} tokens, batch 1) on {lat['device']} {lat['dtype']}, {lat['threads']} threads; "
                  f"model tensors {lat.get('model_mib', 0):.1f} MiB"]
    if layers:
        lines += ["", "## Quantized linear backends", "",
                  f"- layers per backend: {', '.join(f'{b} {n}' for b, n in backends.items())}",
                  *[f"- {c.describe()}" for c in kernels]]
    lines += ["", "## Layers", ""]
    if _plot(records, folder / "layer_loss.png"):
        lines += ["![per-layer loss](layer_loss.png)", ""]
    lines += _layer_table(records)
    md_path.write_text("\n".join(lines) + "\n")
    rank_zero_info(f"run summary: {json_path} and {md_path}")
    return json.loads(text)
