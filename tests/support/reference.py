"""The tiny model's greedy chat answer from a plain single-process run (transformers, no vLLM)."""

from __future__ import annotations

import functools


@functools.cache
def greedy_chat(model: str, question: str, max_tokens: int = 16) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = llm.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))


@functools.cache
def greedy_completion(model: str, prompt: str, max_tokens: int = 8) -> str:
    """The tiny model's greedy continuation of PROMPT (what /v1/completions at temperature 0 gives)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = llm.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
