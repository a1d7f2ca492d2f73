"""Distributed QLoRA fine-tuning: config, model, strategies, data, loop, checkpoints, exports."""
