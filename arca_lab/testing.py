"""Tiny local stand-ins for real hub models, and helpers to find a model's output layer.

`make_tiny_causal_lm(out_dir, arch)` writes a randomly initialised (seeded) causal LM of a few tens of
thousands of parameters plus a tokenizer to `out_dir`, in the same format as a hub checkpoint, so the
`--model <HF id or local dir>` path (AutoModelForCausalLM / AutoTokenizer `from_pretrained`) can be tested
offline. The architectures differ where lab code tends to make assumptions:

| arch   | class             | linear layers | output layer (`lm_head_module_name`)  | tied to input |
|--------|-------------------|---------------|---------------------------------------|---------------|
| qwen3  | Qwen3ForCausalLM  | nn.Linear     | lm_head                               | no            |
| llama  | LlamaForCausalLM  | nn.Linear     | lm_head                               | yes           |
| gpt2   | GPT2LMHeadModel   | Conv1D        | lm_head                               | yes           |
| biogpt | BioGptForCausalLM | nn.Linear     | output_projection                     | yes           |
| bert   | BertLMHeadModel   | nn.Linear     | cls.predictions.decoder (nested, with | yes           |
|        | (is_decoder=True) |               | a dense+LayerNorm transform before)   |               |

So code must find the head with `get_output_embeddings()` (see `lm_head_of`, `lm_head_module_name`), not by
the name ``lm_head``, and must not assume ``hidden_states[-1]`` is the head's input (bert transforms it).

The tokenizer is a byte-level BPE (like Qwen's and Llama 3's) or a SentencePiece-style "metaspace" BPE (like
Llama 2's), trained with the `tokenizers` library on a small built-in corpus of MATH-style text, so MATH
prompts tokenize into sensible pieces; vocabulary 512, EOS ``<|endoftext|>``, pad ``<|pad|>``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from arca_lab.models import lm_head_module_name, lm_head_of  # noqa: F401  (re-exported for tests)

ARCHITECTURES: tuple[str, ...] = ("qwen3", "llama", "gpt2", "biogpt", "bert")
HEAD_TRANSFORM_ARCHITECTURES: tuple[str, ...] = ("gemma2", "granite")
"""Stand-ins whose logits are a transform of the head output: Gemma-2 `final_logit_softcapping` (set to 1.0 here,
so the tanh bends even the small logits of a random model) and Granite `logits_scaling` (8.0: logits / 8)."""
TOKENIZER_KINDS: tuple[str, ...] = ("byte_level", "metaspace")
EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|pad|>", "<|unk|>"
_TIED_DEFAULT = {
    "qwen3": False,
    "llama": True,
    "gpt2": True,
    "biogpt": True,
    "bert": True,
    "gemma2": True,
    "granite": False,
}

_CORPUS = r"""
Problem: What is the value of $x$ if $3x + 7 = 22$?
Please reason step by step, and put your final answer within \boxed{}.
Solution: Subtracting 7 from both sides gives $3x = 15$. Dividing by 3 gives $x = \boxed{5}$.
Simplify $\frac{6}{8}$. Dividing the numerator and the denominator by 2 gives $\boxed{\frac{3}{4}}$.
Since $50 = 25 \cdot 2$, we have $\sqrt{50} = \sqrt{25} \cdot \sqrt{2} = \boxed{5\sqrt{2}}$.
Compute $\dbinom{6}{2}$. We have $\dbinom{6}{2} = \dfrac{6 \times 5}{2 \times 1} = \boxed{15}$.
Factoring gives $(x - 2)(x - 3) = 0$, so the roots are $2$ and $3$. Their sum is $2 + 3 = \boxed{5}$.
Adding 9 to both sides gives $2y = -6$, so $y = \boxed{-3}$.
We have $84 = 2^2 \cdot 3 \cdot 7$ and $126 = 2 \cdot 3^2 \cdot 7$, so $\gcd(84, 126) = \boxed{42}$.
The probability that the number rolled is prime is $\frac{3}{6} = \boxed{\dfrac{1}{2}}$.
The area of the circle is $\pi r^2 = \pi \cdot 3^2 = \boxed{9\pi}$.
Since $2^3 = 8 \equiv 1 \pmod{7}$, the remainder when $2^{10}$ is divided by 7 is $\boxed{2}$.
Adding 1 gives $2x > 6$, so $x > 3$. In interval notation this is $\boxed{(3, \infty)}$.
Since $2^6 = 64$, we have $\log_2 64 = \boxed{6}$. The solutions are $\boxed{-3, 3}$.
With the common denominator 6, $\frac{2}{3} + \frac{1}{6} = \frac{4}{6} + \frac{1}{6} = \boxed{\frac{5}{6}}$.
In a right triangle, $\sin 30^\circ = \frac{1}{2}$ and $\cos 60^\circ = \frac{1}{2}$, and $\tan 45^\circ = 1$.
First $f(1) = 1^2 + 1 = 2$. Then $f(2) = 2^2 + 1 = \boxed{5}$. Therefore the answer is $\boxed{5}$.
The number of positive divisors of $36 = 2^2 \cdot 3^2$ is $(2 + 1)(2 + 1) = \boxed{9}$.
By the Pythagorean theorem the other leg is $\sqrt{13^2 - 5^2} = \sqrt{144} = \boxed{12}$.
Let $x = 0.\overline{3}$. Then $10x = 3.\overline{3}$, so $9x = 3$ and $x = \boxed{\frac{1}{3}}$.
The distance between the points $(1, 2)$ and $(4, 6)$ is $\sqrt{9 + 16} = \boxed{5}$.
Completing the square gives $y = (x - 2)^2 + 3$, so the vertex of the parabola is $\boxed{(2, 3)}$.
Let $A = \{1, 2, 3\}$ and $B = \{2, 3, 4\}$. Then $A \cap B = \boxed{\{2, 3\}}$ and $A \cup B$ has 4 elements.
The determinant of $\begin{pmatrix} 2 & 1 \\ 3 & 4 \end{pmatrix}$ is $2 \cdot 4 - 1 \cdot 3 = \boxed{5}$.
We need to find the number of ways to choose the integers, the sum of the terms, and the product of the roots.
If $a + b = 10$ and $a - b = 4$, then $a = 7$ and $b = 3$, so $ab = 21$. The final answer is $\boxed{21}$.
Note that $\left( \frac{1}{2} \right)^2 = \frac{1}{4}$ and $\sqrt[3]{27} = 3$, so $x \le 3$ and $y \ge 0$.
Therefore, the largest possible value is $\boxed{100}$. Hence the smallest positive integer is $\boxed{1}$.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 36 40 45 50 60 64 72 80 90 99 100 1000
\frac \dfrac \sqrt \cdot \times \div \pi \infty \le \ge \neq \approx \pm \sin \cos \tan \log \ln \left \right
\{ \} \mathbf \text \overline \angle \triangle \circ \equiv \pmod \binom \sum \prod \int \lim \in \cup \cap
+ - * / = < > ^ _ ( ) [ ] { } | , . ; : ! ? ' " $ $$ \[ \] π ≤ ≥ × ÷ ° √
"""


@lru_cache(maxsize=4)
def _tokenizer_json(kind: str, vocab_size: int) -> str:
    """Train the tokenizer once per process; the BPE trainer is deterministic for a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    specials = [EOS_TOKEN, PAD_TOKEN]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: any text is encodable
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        specials.append(UNK_TOKEN)
        alphabet = sorted(set("\n".join(lines).replace(" ", "▁")))
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(kind: str = "byte_level", vocab_size: int = 512):
    """A transformers fast tokenizer (EOS ``<|endoftext|>``, pad ``<|pad|>``) trained on MATH-style text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(kind, vocab_size))
    extra = {"unk_token": UNK_TOKEN} if kind == "metaspace" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def _config(arch: str, vocab_size: int, eos: int, pad: int, tied: bool, hidden: int, layers: int):
    from transformers import BertConfig, BioGptConfig, GPT2Config, LlamaConfig, Qwen3Config

    ids = {"vocab_size": vocab_size, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    common = {"tie_word_embeddings": tied, **ids}
    heads, ffn, positions = 4, 2 * hidden, 1024  # positions: room for 512 prompt + 512 new tokens
    if arch in ("qwen3", "llama"):
        cls = Qwen3Config if arch == "qwen3" else LlamaConfig
        return cls(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,  # grouped-query attention, as in the real models
            head_dim=hidden // heads,
            max_position_embeddings=positions,
            **common,
        )
    if arch in HEAD_TRANSFORM_ARCHITECTURES:
        from transformers import Gemma2Config, GraniteConfig

        sizes = dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            head_dim=hidden // heads,
            max_position_embeddings=positions,
        )
        if arch == "gemma2":
            return Gemma2Config(
                final_logit_softcapping=1.0, query_pre_attn_scalar=hidden // heads, **sizes, **common
            )
        return GraniteConfig(logits_scaling=8.0, **sizes, **common)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions, **common
        )
    if arch == "biogpt":
        return BioGptConfig(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=positions,
            **common,
        )
    if arch == "bert":
        return BertConfig(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=positions,
            is_decoder=True,  # causal self-attention: BertLMHeadModel is then a decoder-only LM
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")


def make_tiny_causal_lm(
    out_dir: str | Path,
    arch: str,
    seed: int = 0,
    vocab_from: str | None = None,
    *,
    tokenizer_kind: str = "byte_level",
    tie_word_embeddings: bool | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
) -> Path:
    """Write a seeded random tiny causal LM of architecture `arch` and its tokenizer to `out_dir`.

    `vocab_from`: a local directory whose tokenizer is copied instead of training the built-in one (the model
    vocabulary then matches it). `tie_word_embeddings`: None keeps the architecture's default (table in the
    module docstring). Returns `out_dir` as a Path; load it with ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHITECTURES + HEAD_TRANSFORM_ARCHITECTURES:
        raise ValueError(
            f"unknown arch {arch!r}; choose one of {ARCHITECTURES + HEAD_TRANSFORM_ARCHITECTURES}"
        )
    out = Path(out_dir)
    if vocab_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(vocab_from)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {vocab_from!r} has no EOS token; the lab needs one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = make_tiny_tokenizer(tokenizer_kind)
    tied = _TIED_DEFAULT[arch] if tie_word_embeddings is None else tie_word_embeddings
    config = _config(
        arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tied, hidden_size, num_layers
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
