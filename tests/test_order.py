"""batch.prefix_window: requests sharing a prompt prefix sent together, memory bounded by the window."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import pairwise

from slurm_vllm.batch.order import KEY_CHARS, grouped, prompt_text


def test_the_prompt_text_is_the_messages_in_order_or_the_prompt() -> None:
    chat = {"messages": [{"role": "system", "content": "S"},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "image_url", "image_url": {}}]}]}
    assert prompt_text(chat) == "system\x00S\x00user\x00a\x00"
    assert prompt_text({"prompt": "p"}) == "p" and prompt_text({"prompt": [1, 2]}) == "[1, 2]"
    assert len(prompt_text({"prompt": "x" * 10 * KEY_CHARS})) == KEY_CHARS


def test_a_shuffled_input_comes_out_grouped_by_prefix_each_item_once() -> None:
    rng = random.Random(3)
    items = [f"system {p} " + "ctx " * 50 + f"q{q}" for p in range(40) for q in range(30)]
    rng.shuffle(items)
    out = list(grouped(items, lambda s: s, window=10_000))
    assert sorted(out) == sorted(items)
    heads = [s.split(" ctx", 1)[0] for s in out]
    assert sum(a != b for a, b in pairwise(heads)) == 39


def test_memory_is_bounded_by_the_window() -> None:
    """The generator never holds more than WINDOW items read and not yet given out."""
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield 999 - i

    given = 0
    for _ in grouped(source(), lambda i: f"{i:04d}", window=100):
        given += 1
        assert pulled - given < 100
    assert given == 1000


def test_window_0_or_1_keeps_the_input_order() -> None:
    assert list(grouped(["b", "a", "c"], lambda s: s, 0)) == ["b", "a", "c"]
    assert list(grouped(["b", "a", "c"], lambda s: s, 1)) == ["b", "a", "c"]
    assert list(grouped(["b", "a", "c"], lambda s: s, 2)) == ["a", "b", "c"]
