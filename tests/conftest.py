import os

# No test may reach the Hugging Face hub; must be set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

# Triton kernels run on CPU only in the interpreter, which must be chosen before they are defined.
# The "triton" backend is never an `auto` candidate on CPU, so this changes nothing else.
os.environ.setdefault("TRITON_INTERPRET", "1")
