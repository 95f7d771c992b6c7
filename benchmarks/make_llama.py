"""A random Llama of realistic size (~1B parameters, bf16) and its tokenizer, built offline.

For the GPU smoke (issue 23): the lent machine reaches no hub, and a tiny model would make load time,
GPU memory and throughput mean nothing. The shape is Llama-3.2-1B's but for the vocabulary (the
test model's offline BPE tokenizer, 1,024 tokens): hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192 — 0.98B parameters, 2.0 GB of safetensors. Built on the GPU when there is one (seconds),
else on the CPU (minutes). The answers are noise; the point is the serving path.

Usage: python benchmarks/make_llama.py OUT_DIR [--layers 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from build_tiny_model import build_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(args.out, 4096)
    config = LlamaConfig(vocab_size=1024, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         initializer_range=0.02, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"{args.out}: random Llama, {params / 1e9:.2f}B parameters, bf16, {size / 2**30:.2f} GiB, "
          f"built on {device} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
