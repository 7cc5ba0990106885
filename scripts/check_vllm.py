"""Does vLLM serve a checkpoint of ours, as ``fit`` predicted, and does it compute the same model?

    HF_HUB_OFFLINE=1 python scripts/check_vllm.py <quantized folder> [<folder> ...] \\
        --vllm-python /path/to/vllm-venv/bin/python --windows 8

For each folder: what ``lightning_gptq.checkpoint.serving`` predicts (``vllm_refusals``, and on a CPU machine
``vllm_cpu_refusals``: the rules behind ``fit``'s warning), then what vLLM did (``scripts/vllm_peer.py`` under
``--vllm-python``: loaded, or its error). When it loaded: perplexity on the first ``--windows`` WikiText-2 windows
(paper protocol) by vLLM (bf16 activations) beside ours on the same windows, fp32 and bf16 (``torch`` oracle
layers), and batch-1 decode ms/token, vLLM's beside ours (``measure_latency``, ``auto`` backend and decode path).
Exit status 0 when every prediction held and every loaded folder's perplexity is within ``--tolerance`` of ours
(bf16 against bf16), else 1. vLLM runs once per folder in its own process: the decode timings are not interleaved.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lightning_gptq.checkpoint import load_quantized, reader_for
from lightning_gptq.checkpoint.serving import vllm_cpu_refusals, vllm_refusals
from lightning_gptq.data.evaluation import eval_tokens, perplexity
from lightning_gptq.models.adapters import is_linear, linear_in_features, linear_out_features
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.nn import QuantLinear, exact_kernels


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every quantized or dense linear below the LM head."""
    head = model.get_output_embeddings()
    return {name: (m.in_features, m.out_features) if isinstance(m, QuantLinear) else
            (linear_in_features(m), linear_out_features(m))
            for name, m in model.named_modules() if m is not head and (isinstance(m, QuantLinear) or is_linear(m))}


def check(folder: str, args, tokens: torch.Tensor | None) -> bool:
    print(f"\n== {folder}")
    model, tokenizer = load_quantized(folder, backend="torch")
    shapes = linear_shapes(model)
    reader = reader_for(folder)(folder, verify=False)  # headers only: the settings as vLLM's rules take them
    settings, layout = reader.settings, reader.layout_name()
    predicted = vllm_refusals(settings, shapes, layout) + vllm_cpu_refusals(settings, shapes)
    print(f"{layout}: bits={settings.bits} group_size={settings.group_size} sym={settings.sym} "
          f"desc_act={settings.desc_act} dynamic={settings.dynamic or '{}'}")
    print("predicted: " + ("serves" if not predicted else "refuses: " + "; ".join(predicted)))

    windows = []
    if tokens is not None:
        n = min(args.windows, tokens.shape[1] // args.seqlen)
        windows = [tokens[0, i * args.seqlen:(i + 1) * args.seqlen].tolist() for i in range(n)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(windows, f)
    command = [args.vllm_python, str(Path(__file__).with_name("vllm_peer.py")), folder, "--windows", f.name,
               "--decode-tokens", str(args.decode_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--repeats", str(args.repeats)] + (["--compiled"] if args.compiled else [])
    run = subprocess.run(command, capture_output=True, text=True)
    Path(f.name).unlink()
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        print(f"vLLM peer failed (exit {run.returncode}): {run.stderr.strip()[-800:]}")
        return False
    peer = json.loads(lines[-1])
    if not peer["loaded"]:
        causes = [line.split("] ")[-1].strip() for line in (run.stderr + run.stdout).splitlines()
                  if re.search(r"\w+Error(: |$)|Value error, |\] +assert ", line)
                  and "Engine core initialization" not in line and not line.startswith("{")]
        cause = " / ".join(causes[-2:]) if causes and causes[-1].endswith("Error") else (causes or [""])[-1]
        print(f"vLLM {peer['vllm']}: refused: {peer['error']}" + (f" (cause: {cause})" if cause else ""))
        held = bool(predicted)
        print(f"prediction {'held' if held else 'FAILED: predicted it serves'}")
        return held
    print(f"vLLM {peer['vllm']}: loaded in {peer['load_s']:.1f} s")
    held = not predicted
    print(f"prediction {'held' if held else 'FAILED: predicted a refusal'}")
    ok = held
    if windows:
        torch.set_grad_enabled(False)
        with exact_kernels():
            ppl_fp32 = perplexity(model, tokens, seqlen=args.seqlen, max_windows=len(windows), progress=False).ppl
            bf16_model, _ = load_quantized(folder, backend="torch", dtype=torch.bfloat16)
            ours_bf16 = perplexity(bf16_model, tokens, seqlen=args.seqlen, max_windows=len(windows), progress=False).ppl
        gap = peer["ppl"] / ours_bf16 - 1
        print(f"perplexity, {len(windows)} WikiText-2 windows of {args.seqlen}: ours fp32 {ppl_fp32:.4f}, ours bf16 "
              f"{ours_bf16:.4f}, vLLM bf16 {peer['ppl']:.4f} ({gap:+.2%} against ours in bf16, "
              f"{peer['ppl'] / ppl_fp32 - 1:+.2%} against fp32)")
        ok = ok and abs(gap) <= args.tolerance
    if args.decode_tokens > 1:
        fast, _ = load_quantized(folder)
        lat = measure_latency(fast, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                              repeats=args.repeats, decode="auto")
        print(f"decode ms/token ({args.prompt_tokens}-token prompt, {args.decode_tokens} tokens, batch 1): ours "
              f"{lat.decode_ms_per_token:.2f} ({lat.decode_path}, fp32 activations), vLLM {peer['decode_ms_per_token']:.2f} "
              f"(bf16, {'eager' if peer['eager'] else 'compiled'}) = {peer['decode_ms_per_token'] / lat.decode_ms_per_token:.2f}x ours; prefill tokens/s: "
              f"ours {lat.prefill_tokens_per_s:.0f}, vLLM {peer['prefill_tokens_per_s']:.0f}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="quantized folders: GPTQ or compressed-tensors layout")
    parser.add_argument("--vllm-python", required=True, help="a Python with vLLM installed (see scripts/vllm_peer.py)")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows to score (0: none)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--wikitext", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--decode-tokens", type=int, default=32, help="0: no decode timing")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="vLLM compiles its model (its default; here: eager)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative perplexity gap allowed (bf16 vs bf16)")
    args = parser.parse_args()
    for folder in args.folders:
        if not Path(folder, "config.json").is_file():
            parser.error(f"not a model folder: {folder}")
    if not Path(args.vllm_python).is_file():
        parser.error(f"--vllm-python: no such file: {args.vllm_python}")
    tokens = None
    if args.windows:
        _, tokenizer = load_quantized(args.folders[0], backend="torch")
        tokens = eval_tokens("wikitext2", tokenizer, path=args.wikitext, seqlen=args.seqlen)
    results = [check(folder, args, tokens) for folder in args.folders]
    print(f"\n{sum(results)} of {len(results)} folders as predicted" + ("" if all(results) else " (see above)"))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
