"""Write a tiny but valid llama GGUF (random weights, small vocabulary, 2 layers) for tests.

No download: llama.cpp loads it and decodes real (if meaningless) tokens, so the
llamacpp backend is exercised end to end on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    """A model's size: width, heads, feed-forward width, layers, context."""

    n_embd: int = 64
    n_head: int = 4
    n_ff: int = 128
    n_layer: int = 2
    n_ctx: int = 512


TINY = Shape()
# Prefill clearly dominates: ~2.5 ms a token on 2 cores (bench/prefix.py).
PREFILL_BOUND = Shape(n_embd=512, n_head=8, n_ff=1024, n_layer=8, n_ctx=4096)
# Decodes like a small real model here: ~25 ms a token on 2 cores (~620 MB of F32 weights, a
# few seconds to write; bench/engine.py).
REALISTIC = Shape(n_embd=1024, n_head=16, n_ff=2816, n_layer=12, n_ctx=512)
WORDS = [
    "the", "a", "bee", "bees", "hive", "queen", "worker", "honey", "flower", "flies", "to",
    "and", "of", "in", "is", "on", "sun", "field", "wax", "comb", "buzz", "sweet", "gold",
]  # fmt: skip


# A chat template in the file's metadata, as real instruct models carry (Jinja, rendered by
# llama-cpp-python): each turn is "[role] content</s>", then "[assistant]" for the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: control tokens, 256 byte tokens (any text encodes), letters, words."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(6)  # BYTE
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁" + w for w in WORDS] + ["▁"]
    pieces += ["▁" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = list(dict.fromkeys(pieces))  # llama.cpp refuses a vocabulary with duplicates
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        scores.append(-float(i))
        types.append(1)  # NORMAL
    return tokens, scores, types


def write_tiny_gguf(
    path: Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE, shape: Shape = TINY
) -> Path:
    """`chat_template` None: a model without one (the backend falls back to a named format)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("apiary-tiny-test")
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weights(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.5).astype(np.float32)

    embd, ff = shape.n_embd, shape.n_ff
    writer.add_tensor("token_embd.weight", weights(n_vocab, embd))
    writer.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    output = weights(n_vocab, embd)
    output[2] = 0.0  # end of sequence stays unlikely: streams run to max_tokens
    output[3:259] = 0.0  # and so do raw bytes: the text is mostly words
    writer.add_tensor("output.weight", output)
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weights(embd, embd) * 0.2)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(ff, embd) * 0.2)
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(ff, embd) * 0.2)
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(embd, ff) * 0.2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
