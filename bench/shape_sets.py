"""Parameter shape sets of real models, for the model-step benchmark (:mod:`bench.model_steps`).

* ``gpt2_small``: GPT-2 small (124M parameters, 148 tensors): token and position embeddings,
  12 blocks of two LayerNorms, the fused qkv projection, the attention output and the two MLP
  matrices with their biases, the final LayerNorm (the head is tied to the embedding);
* ``llama_block``: one LLaMA-style decoder block at TinyLlama-1.1B's sizes (d = 2048, grouped
  queries with 4 key/value heads of 64, SwiGLU MLP of 5632, two RMSNorm weights): 9 tensors, 44M;
* ``2000x1000``, ``200x100k``, ``20x1M``: many equal 1-D tensors (the per-tensor overhead of
  thousands of small tensors, and the bandwidth of a few large ones);
* ``1000x1``: 1000 one-element tensors: a step's host work per tensor, with nothing to compute.
"""

from __future__ import annotations

import math

GPT2_D, GPT2_VOCAB, GPT2_CONTEXT, GPT2_LAYERS = 768, 50257, 1024, 12
LLAMA_D, LLAMA_FFN, LLAMA_KV = 2048, 5632, 256


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes, in ``model.parameters()`` order (148 tensors)."""
    d = GPT2_D
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(GPT2_VOCAB, d), (GPT2_CONTEXT, d), *block * GPT2_LAYERS, (d,), (d,)]


def llama_block() -> list[tuple[int, ...]]:
    """One LLaMA-style decoder block (TinyLlama-1.1B's sizes): attention, SwiGLU MLP, two RMSNorms."""
    d, f, kv = LLAMA_D, LLAMA_FFN, LLAMA_KV
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f), (d,), (d,)]


SHAPE_SETS = {
    "gpt2_small": gpt2_small,
    "2000x1000": lambda: [(1000,)] * 2000,
    "200x100k": lambda: [(100_000,)] * 200,
    "20x1M": lambda: [(1_000_000,)] * 20,
    "llama_block": llama_block,
    "1000x1": lambda: [(1,)] * 1000,
}
"""Each shape set's parameter shapes, by name."""


def numel(shapes: list[tuple[int, ...]]) -> int:
    """Elements over all ``shapes``."""
    return sum(math.prod(s) for s in shapes)
