"""convert: Meta's original LLaMA layout to a Hugging Face folder."""
