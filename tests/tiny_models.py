"""Tiny random models and PEFT prefix adapters built locally, plus the PEFT-forward greedy referee.

Nothing is downloaded: models come from configs and save_pretrained, adapters from get_peft_model.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
                             **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_prefix_adapter(model_dir: Path, out_dir: Path, num_virtual_tokens: int, projection: bool = False,
                        seed: int = 0, scale: float = 1.0) -> Path:
    """A randomly initialised PEFT prefix adapter, saved exactly as PEFT saves trained ones."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                prefix_projection=projection, encoder_hidden_size=32)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.mul_(scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def peft_forward_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int], max_tokens: int,
                        eos: int | None = None) -> list[int]:
    """The referee: re-run the full forward pass each step (PeftModel.forward with a prefix) and take argmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            tokens.append(token)
            if token == eos:
                break
    return out
