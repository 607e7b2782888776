"""Which parameters fine-tune: full, FTLO (attention linear layers only), FTTS (linearized), LoRA (peft)."""
