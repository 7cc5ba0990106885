"""Resident memory of a ``fit`` stage by stage: prints RSS at each stage's start and the peak so far
(sampled every 50 ms in a thread), for finding what a streaming run holds at its peak.

    python experiments/trace_memory.py fit --model.model=/tmp/llama-1b-slice --model.streaming=true \
        --data.nsamples=8 --data.seqlen=512 "--data.eval_datasets=[]" --model.eval_after=false --model.latency=false
"""
import sys
import threading
import time

from lightning_gptq.lightning.plan import resident_bytes
from lightning_gptq.cli import main
peak = [0, ""]
state = {"stage": "load"}
def sampler():
    while True:
        r = resident_bytes()
        if r > peak[0]:
            peak[0], peak[1] = r, state["stage"]
        time.sleep(0.05)
threading.Thread(target=sampler, daemon=True).start()
import lightning_gptq.lightning.module as M
orig = M.GPTQModule.on_train_epoch_start
def patched(self):
    state["stage"] = f"epoch {self.current_epoch} {self.stage}"
    print(f"RSS {resident_bytes()/2**20:.0f} MiB at start of {state['stage']}; peak so far {peak[0]/2**20:.0f} ({peak[1]})", flush=True)
    return orig(self)
M.GPTQModule.on_train_epoch_start = patched
orig_end = M.GPTQModule.on_train_end
def patched_end(self):
    state["stage"] = "train_end (write)"
    print(f"RSS {resident_bytes()/2**20:.0f} MiB at train end; peak so far {peak[0]/2**20:.0f} ({peak[1]})", flush=True)
    return orig_end(self)
M.GPTQModule.on_train_end = patched_end
main(sys.argv[1:])
print(f"final peak {peak[0]/2**20:.0f} MiB during {peak[1]}")
