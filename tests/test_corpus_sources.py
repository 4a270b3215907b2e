"""Corpus sources beyond python-docs: a Hugging Face dataset (`hf`, streamed through `datasets`, here
saved locally in its formats) and a researcher's own files (`files`: .txt, .jsonl, .parquet, local
and on a moto S3 server). Offline: every dataset is made here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nlrewrite_core import corpus, corpus_sources
from nlrewrite_core.config import ConfigError, CorpusConfig, load_config

from conftest import moto_s3

SPLITS = {"seq_len": 16, "n_eval": 4, "n_calib": 4, "n_explain": 4, "vocab_size": 300, "max_chars": 20_000}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Distinct English documents (the stdlib's docstrings)."""
    import itertools

    docs = (corpus.normalise_whitespace(d) for d in corpus.stdlib_docstrings())
    return list(itertools.islice((d for d in docs if len(d) > 40), 600))


def hf_cfg(path, **kw) -> CorpusConfig:
    return CorpusConfig(source="hf", dataset=str(path), max_tokens=kw.pop("max_tokens", 20_000), **SPLITS, **kw)


def files_cfg(paths, **kw) -> CorpusConfig:
    return CorpusConfig(source="files", paths=[str(p) for p in paths], **SPLITS, **kw)


def reference(docs: list[str], cfg: CorpusConfig) -> tuple[np.ndarray, np.ndarray]:
    """What the corpus must be: the documents in order, tokenized, cut, split by hash."""
    tok = corpus.train_tokenizer(corpus.DOC_SEPARATOR.join(_sample(docs, cfg.max_chars)), cfg.vocab_size)
    seqs = corpus.cut_sequences(corpus.tokenizer_encoder(tok), docs, corpus.eos_id(tok), cfg.seq_len, cfg.max_tokens)
    return seqs, corpus.assign_splits(seqs, cfg)


def _sample(docs: list[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        out.append(d)
        n += len(d) + 2
        if n >= max_chars:
            break
    return out


def tokens_of(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("tokens").to_pylist(), dtype=np.int32)


def test_hf_save_to_disk_and_parquet_dir_agree(docs, tmp_path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs[:250]}), tmp_path / "pq" / "train-00000.parquet")
    pq.write_table(pa.table({"text": docs[250:]}), tmp_path / "pq" / "train-00001.parquet")
    a, tok = corpus.build_corpus(hf_cfg(tmp_path / "disk"))
    b, _ = corpus.build_corpus(hf_cfg(tmp_path / "pq"))
    assert a.equals(b)
    seqs, splits = reference(docs, hf_cfg(tmp_path / "disk"))
    assert np.array_equal(tokens_of(a), seqs) and a.column("split").to_pylist() == splits.tolist()
    assert len(a) == 20_000 // 16  # the token budget
    counts = {s: a.column("split").to_pylist().count(s) for s in corpus.SPLITS}
    assert (counts["eval"], counts["calib"], counts["explain"]) == (4, 4, 4)
    # a DatasetDict saved to disk: corpus.split picks one
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                          "validation": datasets.Dataset.from_dict({"text": docs[:5]})}).save_to_disk(str(tmp_path / "dd"))
    c, _ = corpus.build_corpus(hf_cfg(tmp_path / "dd"))
    assert c.equals(a)
    with pytest.raises(ValueError, match=r"no split 'test' \(corpus.split\).*'train', 'validation'"):
        corpus.build_corpus(hf_cfg(tmp_path / "dd", split="test"))


def test_budget_bounds_reading() -> None:
    """Streaming: the token budget, not the source, decides how much is read."""
    read = 0

    def endless():
        nonlocal read
        while True:
            read += 1
            yield "one two three four five six seven"

    tok = corpus.train_tokenizer("one two three four five six seven\n\nseven six", 270)
    seqs = corpus.cut_sequences(corpus.tokenizer_encoder(tok), endless(), corpus.eos_id(tok), 8, max_tokens=8 * 500)
    assert seqs.shape == (500, 8) and read <= 2 * corpus_sources.DOC_BATCH
    # without a budget the same documents give the same first windows
    some = corpus.cut_sequences(corpus.tokenizer_encoder(tok), ["one two three four five six seven"] * 3000,
                                corpus.eos_id(tok), 8)
    assert np.array_equal(some[:500], seqs)


def test_hf_errors_name_the_field(docs, tmp_path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(ValueError, match=r"no column 'text' \(corpus.text_column\).*'body'"):
        corpus.build_corpus(hf_cfg(tmp_path / "disk"))
    with pytest.raises(ValueError, match=r"corpus.dataset .*nope"):
        corpus.build_corpus(hf_cfg(tmp_path / "nope"))
    datasets.Dataset.from_dict({"text": ["  ", ""]}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="yielded no text"):
        corpus.build_corpus(hf_cfg(tmp_path / "empty"))
    datasets.Dataset.from_dict({"text": ["a short document.", "another one."]}).save_to_disk(str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"too few for corpus.n_eval.*corpus.max_tokens"):
        corpus.build_corpus(hf_cfg(tmp_path / "small"))
    with pytest.raises(ConfigError, match="corpus.max_tokens is required"):
        load_config("micro", overrides={"corpus": {"source": "hf", "dataset": "x"}})
    with pytest.raises(ConfigError, match="corpus.dataset is required"):
        load_config("micro", overrides={"corpus": {"source": "hf", "max_tokens": 1000}})
    with pytest.raises(ConfigError, match="corpus.paths is required"):
        load_config("micro", overrides={"corpus": {"source": "files"}})


def write_files(docs: list[str], root) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(docs[0])
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "n": i}) for i, d in enumerate(docs[1:100])) + "\n")
    pq.write_table(pa.table({"text": docs[100:]}), root / "c.parquet", row_group_size=50)


def test_files_local_and_s3(docs, tmp_path) -> None:
    import boto3

    write_files(docs, tmp_path / "data")
    cfg = files_cfg([tmp_path / "data" / "*.*"])
    assert list(corpus_sources.file_documents(cfg)) == docs
    local, _ = corpus.build_corpus(cfg)
    seqs, splits = reference(docs, cfg)
    assert np.array_equal(tokens_of(local), seqs) and local.column("split").to_pylist() == splits.tolist()
    # the same documents from a Hugging Face dataset give the same corpus (same splits by hash)
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "disk"))
    via_hf, _ = corpus.build_corpus(hf_cfg(tmp_path / "disk", max_tokens=10**9))
    assert via_hf.equals(local)

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env, ("corpus",)) as url:
        s3 = boto3.client("s3", endpoint_url=url)
        for f in sorted((tmp_path / "data").iterdir()):
            s3.upload_file(str(f), "corpus", f"mine/2026/{f.name}")
        s3_cfg = files_cfg(["s3://corpus/mine/**/*.jsonl", "s3://corpus/mine/2026/a.txt", "s3://corpus/mine/*/c.parquet"],
                           endpoint_url=url)
        got = list(corpus_sources.file_documents(s3_cfg))
        assert got == docs[1:100] + docs[:1] + docs[100:]
        with pytest.raises(ValueError, match=r"corpus.paths: no file matches 's3://corpus/other/\*.txt'"):
            list(corpus_sources.file_documents(files_cfg(["s3://corpus/other/*.txt"], endpoint_url=url)))


def test_files_errors(docs, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"corpus.paths: no file matches"):
        corpus.build_corpus(files_cfg([tmp_path / "missing" / "*.txt"]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"is not one of \.txt, \.jsonl, \.parquet"):
        corpus.build_corpus(files_cfg([tmp_path / "x.csv"]))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl' line 1 has no column 'text' \(corpus.text_column\)"):
        corpus.build_corpus(files_cfg([tmp_path / "bad.jsonl"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet' has no column 'text'"):
        corpus.build_corpus(files_cfg([tmp_path / "bad.parquet"]))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="yielded no text"):
        corpus.build_corpus(files_cfg([tmp_path / "blank.txt"]))


def test_new_fields_leave_default_keys_alone() -> None:
    dumped = load_config("tiny").model_dump()["corpus"]
    assert set(dumped) == {"source", "max_chars", "vocab_size", "seq_len", "n_eval", "n_calib", "n_explain", "seed"}
    cfg = load_config("pythia-160m")
    assert cfg.corpus.source == "hf" and cfg.corpus.dataset == "EleutherAI/the_pile_deduplicated"
    assert cfg.corpus.text_column == "text" and cfg.corpus.max_tokens >= cfg.transcoder.max_train_tokens
