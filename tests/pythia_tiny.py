"""Offline stand-ins for the pythia-160m preset's downloads: a GPT-NeoX with Pythia's architecture
(any width/depth; random weights from a config) and a tokenizer in Pythia's format (byte-level BPE saved
as GPTNeoXTokenizer, `<|endoftext|>` = id 0 as bos/eos/unk, `<|padding|>` = id 1, embedding matrix
padded past the vocabulary like Pythia's 50,304 > 50,277), saved with save_pretrained; and a local
copy of a text dataset in `datasets`' save_to_disk format standing in for the Pile."""

from __future__ import annotations

import itertools
from pathlib import Path

PYTHIA_160M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072}
"""EleutherAI/pythia-160m's shape (its config.json); vocabulary 50,304 embeddings, context 2,048."""


def documents(n: int) -> list[str]:
    """n English documents (standard-library docstrings, whitespace as written)."""
    from nlrewrite_core import corpus

    docs = (d for d in corpus.stdlib_docstrings() if len(d) > 40)
    return list(itertools.islice(docs, n))


def save_text_dataset(path: str | Path, docs: list[str]) -> str:
    """The documents as a `datasets` Dataset (a `text` column, like the Pile's), saved with save_to_disk."""
    import datasets

    datasets.Dataset.from_dict({"text": docs, "meta": [{"source": "stdlib"}] * len(docs)}).save_to_disk(str(path))
    return str(path)


def build_pythia_like(path: str | Path, hidden_size: int = 32, num_layers: int = 8, num_heads: int = 4,
                      intermediate_size: int = 128, vocab_size: int = 512, embeddings: int | None = None,
                      texts: list[str] | None = None, seed: int = 0) -> str:
    """A random-weight GPTNeoXForCausalLM with Pythia's architecture (parallel residual, 25% rotary,
    untied embeddings) and a `vocab_size` BPE tokenizer in Pythia's format, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPTNeoXForCausalLM, GPTNeoXTokenizerFast

    from nlrewrite_core import subject
    from nlrewrite_core.config import SubjectConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or documents(400), trainer)
    fast = GPTNeoXTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                unk_token="<|endoftext|>", pad_token="<|padding|>")
    torch.manual_seed(seed)
    cfg = subject.model_config(SubjectConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                             intermediate_size=intermediate_size),
                               embeddings or len(fast) + 7, 2048)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)
