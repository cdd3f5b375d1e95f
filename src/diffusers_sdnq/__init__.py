"""diffusers-sdnq: load, run, fine-tune and write SDNQ-quantized models with the Hugging Face stack."""

__version__ = "0.1.0"
