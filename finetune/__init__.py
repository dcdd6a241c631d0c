"""LoRA fine-tuning of the generator in sequential stages (general → domain → subdomain)."""
