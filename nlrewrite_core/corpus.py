"""Corpus stage: English text that ships with Python, a byte-level BPE tokenizer (trained here, or
the subject's own from the hub), and splits.

Everything here is a pure function of its arguments (and of the Python installation whose
documentation is read): the same config gives the same text, tokenizer, sequences and splits.
No storage I/O: the caller writes the artifacts. The ``hf`` and ``files`` document sources are in
nlrewrite_core.corpus_sources.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import re
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nlrewrite_core.config import ConfigError, CorpusConfig
from nlrewrite_core.corpus_sources import DOC_BATCH, file_documents, hf_documents

EOS = "<|endoftext|>"
"""Special token that separates documents (and ends each one)."""

DOC_SEPARATOR = "\n\n"
"""How documents are joined in the collected text (and split again before tokenizing)."""

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
"""Standard-library directories whose files are not read."""

SPLITS = ("eval", "calib", "explain", "train")
"""Split names, in the order sequences are assigned to them."""

MIN_TRAIN_SEQUENCES = 16
"""The train split must hold at least this many sequences."""


# ----------------------------------------------------------------------------------- text


def normalise_whitespace(text: str) -> str:
    """Light whitespace clean-up: strip line ends, collapse runs of blank lines and tabs.

    Paragraph breaks inside a document become a single newline, so that ``DOC_SEPARATOR``
    ("\\n\\n") only ever separates documents.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip()
    return re.sub(r"\n{2,}", "\n", text)


def pydoc_topic_texts() -> list[str]:
    """The texts of ``pydoc_data.topics.topics`` (the language reference), sorted by key."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """Standard-library ``.py`` files in sorted order, skipping test, idlelib and site-packages dirs."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of Python source, in source order (parsed, never imported)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docs.append(doc)
    return docs


def stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Docstrings of the standard library's source files, files in sorted order."""
    for path in stdlib_source_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield from module_docstrings(source)


def collect_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Normalised, non-empty documents in a fixed order: pydoc topics, then stdlib docstrings."""
    if cfg.source != "python-docs":
        raise ValueError(f"unknown corpus.source {cfg.source!r}")
    for doc in pydoc_topic_texts():
        doc = normalise_whitespace(doc)
        if doc:
            yield doc
    for doc in stdlib_docstrings():
        doc = normalise_whitespace(doc)
        if doc:
            yield doc


def collect_text(cfg: CorpusConfig) -> str:
    """English text that ships with Python, documents joined by "\\n\\n", capped at ``cfg.max_chars``.

    The order is fixed (pydoc topics sorted by key, then docstrings of stdlib files in sorted
    path order), so the result is deterministic for a given Python installation.
    """
    parts: list[str] = []
    total = 0
    for doc in collect_documents(cfg):
        parts.append(doc)
        total += len(doc) + len(DOC_SEPARATOR)
        if total >= cfg.max_chars:
            break
    return DOC_SEPARATOR.join(parts)[: cfg.max_chars]


# ------------------------------------------------------------------------------ tokenizer


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text`` (deterministic), with ``<|endoftext|>`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(split_documents(text), trainer=trainer, length=None)
    return tokenizer


def split_documents(text: str) -> list[str]:
    """The documents of a collected text (non-empty pieces between ``DOC_SEPARATOR``)."""
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of the ``<|endoftext|>`` token."""
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS!r} token")
    return token_id


def tokenize_sequences(tokenizer: Tokenizer, text: str, seq_len: int) -> np.ndarray:
    """Tokenize documents, join them with the eos id, and cut non-overlapping ``seq_len`` windows.

    Each document is followed by eos. The remainder that does not fill a window is dropped.
    Returns int32 of shape (n_seq, seq_len).
    """
    return cut_sequences(tokenizer_encoder(tokenizer), split_documents(text), eos_id(tokenizer), seq_len)


# --------------------------------------------------------------------------------- splits


def sequence_hash(seed: int, tokens: np.ndarray) -> bytes:
    """Stable hash of one sequence: sha256 of the seed and the sequence's int32 token bytes."""
    h = hashlib.sha256(str(seed).encode() + b":")
    h.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return h.digest()


def check_split_sizes(n_sequences: int, cfg: CorpusConfig, estimate: bool = False) -> None:
    """Raise ConfigError, naming the fields and the fix, when `n_sequences` cannot hold the splits:
    ``n_eval + n_calib + n_explain + MIN_TRAIN_SEQUENCES``. `estimate`: n_sequences is an upper bound
    computed before the corpus is built (the message says so)."""
    held_out = cfg.n_eval + cfg.n_calib + cfg.n_explain
    if n_sequences < held_out + MIN_TRAIN_SEQUENCES:
        has = f"at most {n_sequences} sequences of corpus.seq_len {cfg.seq_len}" if estimate else \
            f"{n_sequences} sequences"
        raise ConfigError(
            f"the corpus has {has}, too few for corpus.n_eval ({cfg.n_eval}) + corpus.n_calib "
            f"({cfg.n_calib}) + corpus.n_explain ({cfg.n_explain}) + at least {MIN_TRAIN_SEQUENCES} "
            f"train sequences: lower those fields or corpus.seq_len, or give the corpus more text (corpus.max_chars, "
            f"corpus.max_tokens, a larger corpus.dataset or more corpus.paths)"
        )


def assign_splits(seqs: np.ndarray, cfg: CorpusConfig) -> np.ndarray:
    """Split name of each sequence ("eval", "calib", "explain" or "train").

    Sequences are ordered by a stable hash (ties, i.e. duplicate sequences, by index); the first
    ``n_eval`` go to eval, the next ``n_calib`` to calib, the next ``n_explain`` to explain and
    the rest to train. Raises ConfigError (`check_split_sizes`), naming the fields, if fewer than
    ``n_eval + n_calib + n_explain + MIN_TRAIN_SEQUENCES`` sequences exist.
    """
    n = len(seqs)
    held_out = cfg.n_eval + cfg.n_calib + cfg.n_explain
    check_split_sizes(n, cfg)
    order = sorted(range(n), key=lambda i: (sequence_hash(cfg.seed, seqs[i]), i))
    splits = np.empty(n, dtype=object)
    bounds = np.cumsum([0, cfg.n_eval, cfg.n_calib, cfg.n_explain, n - held_out])
    for name, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
        splits[order[start:stop]] = name
    return splits.astype(str)


def load_hf_tokenizer(name: str):
    """A Hugging Face fast tokenizer (hub id or local directory) via transformers' AutoTokenizer.

    Raises ValueError, naming ``corpus.tokenizer``, when it is not a fast tokenizer (its
    ``backend_tokenizer`` is what the corpus artifact stores) or has no eos token.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name)
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"corpus.tokenizer {name!r} is not a fast (Rust) tokenizer: cannot store it as tokenizer.json")
    if hf.eos_token_id is None:
        raise ValueError(f"corpus.tokenizer {name!r} has no eos token to put between documents")
    return hf


def tokenize_sequences_hf(hf_tokenizer, text: str, seq_len: int) -> np.ndarray:
    """Like ``tokenize_sequences`` with a Hugging Face tokenizer: each document is encoded without
    special tokens and followed by the tokenizer's eos id. Returns int32 (n_seq, seq_len)."""
    return cut_sequences(hf_encoder(hf_tokenizer), split_documents(text), int(hf_tokenizer.eos_token_id), seq_len)


# ---------------------------------------------------------------------- streamed sources

Encoder = Callable[[list[str]], list[list[int]]]
"""Encodes a batch of documents (no special tokens) to token id lists."""


def hf_encoder(hf_tokenizer) -> Encoder:
    """Batch encoder of a transformers tokenizer (no special tokens)."""
    return lambda docs: hf_tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def tokenizer_encoder(tokenizer: Tokenizer) -> Encoder:
    """Batch encoder of a ``tokenizers.Tokenizer``."""
    return lambda docs: [e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)]


def iter_sequences(encode: Encoder, docs: Iterable[str], eos: int, seq_len: int,
                   max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Stream ``seq_len`` windows (int32 [n, seq_len] blocks) of the documents, each followed by eos.

    Documents are encoded ``DOC_BATCH`` at a time; the tokens that do not fill a window carry over to
    the next batch, and the remainder at the end is dropped. Stops reading ``docs`` as soon as
    ``max_tokens // seq_len`` windows are out (all windows when None): the budget bounds the work.
    """
    max_seqs = None if max_tokens is None else max_tokens // seq_len
    n_out = 0
    carry = np.zeros(0, dtype=np.int32)
    for batch in _batched(docs, DOC_BATCH):
        ids = encode(batch)
        total = sum(len(x) for x in ids) + len(ids)
        flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), dtype=np.int32, count=total)
        stream = np.concatenate([carry, flat])
        n = len(stream) // seq_len
        if max_seqs is not None:
            n = min(n, max_seqs - n_out)
        if n:
            yield stream[: n * seq_len].reshape(n, seq_len)
            n_out += n
        carry = stream[n * seq_len:]
        if max_seqs is not None and n_out >= max_seqs:
            return


def cut_sequences(encode: Encoder, docs: Iterable[str], eos: int, seq_len: int,
                  max_tokens: int | None = None) -> np.ndarray:
    """All windows of ``iter_sequences`` as one int32 (n_seq, seq_len) array."""
    blocks = list(iter_sequences(encode, docs, eos, seq_len, max_tokens))
    return np.concatenate(blocks) if blocks else np.zeros((0, seq_len), dtype=np.int32)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """The source's documents, in a fixed order (python-docs: split from ``collect_text``)."""
    if cfg.source == "python-docs":
        return iter(split_documents(collect_text(cfg)))
    if cfg.source == "hf":
        return hf_documents(cfg)
    return file_documents(cfg)


def _source_name(cfg: CorpusConfig) -> str:
    return {"python-docs": "the python-docs text", "hf": f"corpus.dataset {cfg.dataset!r}",
            "files": f"corpus.paths {cfg.paths}"}[cfg.source]


def build_corpus(cfg: CorpusConfig) -> tuple[pa.Table, Tokenizer]:
    """Read the source's documents, train (or load, when ``cfg.tokenizer`` names one) the tokenizer,
    cut sequences (streaming, up to ``cfg.max_tokens``) and assign splits.

    Returns a table (seq_id int64, split string, tokens list<int32>) and the tokenizer (a
    ``tokenizers.Tokenizer``: a loaded HF tokenizer's ``backend_tokenizer``). Raises ValueError when
    the source yields no text, or too few sequences for the requested splits.
    """
    docs = iter_documents(cfg)
    if cfg.tokenizer == "train":
        # Trained on the source's first max_chars characters (python-docs: all of its text), which are
        # then tokenized first.
        sample: list[str] = []
        chars = 0
        for doc in docs:
            sample.append(doc)
            chars += len(doc) + len(DOC_SEPARATOR)
            if chars >= cfg.max_chars and cfg.source != "python-docs":  # python-docs: capped already
                break
        if not sample:
            raise ValueError(f"{_source_name(cfg)} yielded no text (corpus.source {cfg.source!r})")
        tokenizer = train_tokenizer(DOC_SEPARATOR.join(sample), cfg.vocab_size)
        encode, eos, docs = tokenizer_encoder(tokenizer), eos_id(tokenizer), itertools.chain(sample, docs)
    else:
        hf = load_hf_tokenizer(cfg.tokenizer)
        tokenizer = hf.backend_tokenizer
        # The Rust tokenizer's own batch call: the same ids as hf_encoder (tests check it) without
        # transformers' per-document conversion (~1/3 of the time).
        encode, eos = tokenizer_encoder(tokenizer), int(hf.eos_token_id)
    n_docs = 0

    def counted(it: Iterable[str]) -> Iterator[str]:
        nonlocal n_docs
        for doc in it:
            n_docs += 1
            yield doc

    seqs = cut_sequences(encode, counted(docs), eos, cfg.seq_len, cfg.max_tokens)
    if n_docs == 0:
        raise ValueError(f"{_source_name(cfg)} yielded no text (corpus.source {cfg.source!r})")
    splits = assign_splits(seqs, cfg)
    table = pa.table({
        "seq_id": pa.array(np.arange(len(seqs), dtype=np.int64)),
        "split": pa.array(splits.tolist(), type=pa.string()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(seqs.reshape(-1)), cfg.seq_len).cast(pa.list_(pa.int32())),
    })
    return table, tokenizer


def split_tokens(table: pa.Table, split: str) -> np.ndarray:
    """Token matrix (n_seq, seq_len) int32 of one split of a corpus table, in seq_id order."""
    mask = np.asarray(table.column("split").to_pylist()) == split
    ids = np.asarray(table.column("seq_id").to_numpy())[mask]
    rows = [np.asarray(t, dtype=np.int32) for t, m in zip(table.column("tokens").to_pylist(), mask) if m]
    order = np.argsort(ids, kind="stable")
    if not rows:
        return np.zeros((0, 0), dtype=np.int32)
    return np.stack(rows)[order]
