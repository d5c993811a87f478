"""Offline tools: training a PEFT prefix, evaluating it against the base model, the demo data and the demo."""
