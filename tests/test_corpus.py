"""Tests of the corpus stage: text, tokenizer, sequences and splits."""

from __future__ import annotations

import numpy as np
import pytest

from nlrewrite_core import corpus
from nlrewrite_core.config import CorpusConfig

SMALL = CorpusConfig(max_chars=60_000, vocab_size=300, seq_len=16, n_eval=8, n_calib=8, n_explain=8)


@pytest.fixture(scope="module")
def built():
    return corpus.build_corpus(SMALL)


def test_collect_text_is_deterministic_and_capped() -> None:
    a = corpus.collect_text(SMALL)
    assert a == corpus.collect_text(SMALL)
    assert 0 < len(a) <= SMALL.max_chars
    assert "\n\n" in a and "\n\n\n" not in a


def test_module_docstrings_are_parsed_not_imported() -> None:
    src = '"""Mod doc."""\nimport does_not_exist\nclass A:\n    """Class doc."""\n    def f(self):\n        """Fn doc."""\n'
    assert corpus.module_docstrings(src) == ["Mod doc.", "Class doc.", "Fn doc."]
    assert corpus.module_docstrings("def (:") == []


def test_skips_test_dirs() -> None:
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root) for f in corpus.stdlib_source_files()]
    assert rel and all(not ({"test", "tests", "idlelib", "site-packages"} & set(r.parts)) for r in rel)
    assert rel == sorted(rel, key=lambda p: p.as_posix())


def test_table_schema_and_shapes(built) -> None:
    table, tok = built
    assert table.column_names == ["seq_id", "split", "tokens"]
    assert str(table.schema.field("seq_id").type) == "int64"
    assert str(table.schema.field("tokens").type) == "list<item: int32>"
    assert tok.token_to_id(corpus.EOS) is not None
    lengths = {len(t) for t in table.column("tokens").to_pylist()}
    assert lengths == {SMALL.seq_len}
    assert max(max(t) for t in table.column("tokens").to_pylist()) < tok.get_vocab_size()


def test_splits_disjoint_and_sized(built) -> None:
    table, _ = built
    splits = np.asarray(table.column("split").to_pylist())
    counts = {s: int((splits == s).sum()) for s in corpus.SPLITS}
    assert counts["eval"] == SMALL.n_eval and counts["calib"] == SMALL.n_calib
    assert counts["explain"] == SMALL.n_explain and counts["train"] == len(splits) - 24
    ids = {s: set(np.asarray(table.column("seq_id").to_pylist())[splits == s]) for s in corpus.SPLITS}
    for a in corpus.SPLITS:
        for b in corpus.SPLITS:
            if a < b:
                assert not ids[a] & ids[b]
    assert corpus.split_tokens(table, "eval").shape == (SMALL.n_eval, SMALL.seq_len)


def test_build_is_deterministic(built) -> None:
    table, tok = built
    table2, tok2 = corpus.build_corpus(SMALL)
    assert table.equals(table2)
    assert tok.to_str() == tok2.to_str()


def test_assign_splits_depends_on_seed_only_through_hash() -> None:
    seqs = np.arange(64 * 4, dtype=np.int32).reshape(64, 4)
    cfg = CorpusConfig(n_eval=4, n_calib=4, n_explain=4)
    a = corpus.assign_splits(seqs, cfg)
    assert (a == corpus.assign_splits(seqs, cfg)).all()
    # a split follows its sequence, wherever the sequence sits
    perm = np.random.default_rng(1).permutation(64)
    assert (corpus.assign_splits(seqs[perm], cfg) == a[perm]).all()
    assert not (corpus.assign_splits(seqs, cfg.model_copy(update={"seed": 1})) == a).all()


def test_too_few_sequences_raises() -> None:
    seqs = np.zeros((20, 8), dtype=np.int32) + np.arange(20, dtype=np.int32)[:, None]
    with pytest.raises(ValueError, match="n_eval.*n_calib.*n_explain"):
        corpus.assign_splits(seqs, CorpusConfig(n_eval=4, n_calib=4, n_explain=4))


def test_tokenize_sequences_chunks_with_eos() -> None:
    tok = corpus.train_tokenizer("hello world\n\nhello there world\n\nworld hello", 270)
    seqs = corpus.tokenize_sequences(tok, "hello world\n\nhello there", 3)
    assert seqs.dtype == np.int32 and seqs.shape[1] == 3
    eos = corpus.eos_id(tok)
    flat = seqs.ravel().tolist()
    assert eos in flat
    assert tok.decode([t for t in flat if t != eos]).startswith("hello world")
