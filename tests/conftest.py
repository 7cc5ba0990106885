import os

# No test may reach the Hugging Face hub; must be set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
