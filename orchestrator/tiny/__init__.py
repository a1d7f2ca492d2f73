"""Embedded default model and dataset: a tiny character-level Llama and checkable instruction tasks."""
