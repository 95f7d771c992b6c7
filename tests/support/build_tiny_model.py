"""Build a tiny random Llama and a byte-level BPE tokenizer offline (no hub), for the e2e tests.

Shape: hidden 128, 4 layers, 4 attention heads, 4 KV heads (head_dim 32), vocab 1024, float32,
so that tensor parallel 2 and pipeline parallel 2 both divide it. Weights are drawn with a fixed
seed and a large initializer range so that greedy decoding has wide top-1 margins: the greedy
text is then identical across TP/PP/Ray layouts and a single process, a cheap correctness check.

`--bench`: a larger random Llama for benchmarks where prefill must cost something (the batch
prefix benchmark): hidden 256, 4 layers, 8 heads, 2,048 positions (~4M parameters).

Usage: python build_tiny_model.py OUT_DIR [--bench]
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

WORDS = (  # noqa: SIM905
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people "
    "my over know water than call first who may down side been now find slurm node gpu model"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(lines: int) -> Iterator[str]:
    rng = random.Random(0)
    for _ in range(lines):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) + "."


def build_tokenizer(out: Path, max_length: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(4000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", chat_template=CHAT_TEMPLATE, model_max_length=max_length,
    )
    fast.save_pretrained(out)


def build_model(out: Path, bench: bool = False) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = (dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=2048) if bench else
             dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=512))
    config = LlamaConfig(
        vocab_size=1024, num_hidden_layers=4, **shape,  # type: ignore[arg-type]
        initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)


def main() -> None:
    out = Path(sys.argv[1])
    bench = "--bench" in sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, 2048 if bench else 512)
    build_model(out, bench)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
