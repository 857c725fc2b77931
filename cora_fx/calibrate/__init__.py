"""The data-aware steps on a prepared model: activation ranges, GPTQ rounding, the rank search, BatchNorm
correction, fine-tuning, with what they share (batches, objectives, the check of the first batch, distributed)."""
