"""Helpers to build tiny reference models with transformers (PyTorch, fp32)."""
import numpy as np
import torch
import transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)


def hf_config(**kw):
    return transformers.LlamaConfig(**{**BASE, **kw})


def hf_model(seed=0, std=0.02, cls=transformers.LlamaForCausalLM, **kw):
    torch.manual_seed(seed)
    cfg = hf_config(initializer_range=std, **kw)
    m = cls(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at 1: randomise them so a swapped norm is caught
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def hf_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(mask))
        if positions is not None:
            kw["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()
