import os

# No test may reach the Hugging Face hub; must be set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

# Triton kernels run on CPU only in the interpreter, which must be chosen before they are defined.
# The "triton" backend is never an `auto` candidate on CPU, so this changes nothing else.
os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's on-disk timing cache (nn/autotune_cache.py) off: every test times what it needs, whatever ran before.
# The tests of the cache switch it on in a temporary folder.
os.environ.setdefault("LIGHTNING_GPTQ_AUTOTUNE_CACHE", "0")
