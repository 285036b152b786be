"""LLaDA2.0 (block-diffusion MoE) support: plain-torch reference model and reference decoding."""
