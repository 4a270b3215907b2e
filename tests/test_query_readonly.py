"""`nlrewrite query` runs reads only: every attack of issue 12 exits 2 with one line and changes
nothing, while ordinary reads (and DESCRIBE, SHOW, EXPLAIN, comments, several statements) work."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from nlrewrite_core.query import QueryRefused, check_read_only


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def attack_env(micro_run, tmp_path):
    storage, result = micro_run
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-7f3a\n")
    ce = Path(storage, "artifacts", "evaluate", result["keys"]["evaluate"], "ce.parquet")
    return storage, secret, ce, tmp_path


ATTACKS = {
    "read_text of any file": ("select content from read_text('{secret}')", "SQL error"),
    "read_parquet by path": ("select * from read_parquet('{ce}')", "SQL error"),
    "glob": ("select * from glob('{tmp}/*')", "SQL error"),
    "copy over an artifact": ("copy (select 'x' as condition) to '{ce}' (format parquet)", "refused COPY"),
    "copy after a comment": ("-- only a comment\n/* and another */ copy (select 1) to '{tmp}/x.csv'", "refused COPY"),
    "copy as a second statement": ("select 1; copy (select 1) to '{tmp}/x.csv'", "refused COPY"),
    "explain analyze copy": ("explain analyze copy (select 1) to '{tmp}/x.csv'", "refused EXPLAIN"),
    "copy inside query()": ("select * from query('copy (select 1) to ''{tmp}/x.csv''')", "SQL error"),
    "attach": ("attach '{tmp}/x.db' as x", "refused ATTACH"),
    "install": ("install httpfs", "refused LOAD"),
    "load": ("load httpfs", "refused LOAD"),
    "set to re-enable": ("set enable_external_access = true", "refused SET"),
    "reset the lock": ("reset lock_configuration", "refused"),
    "pragma": ("pragma enable_profiling", "refused PRAGMA"),
    "create table": ("create table t as select * from ce", "refused CREATE"),
    "export database": ("export database '{tmp}/dump'", "refused"),
    "nothing": ("-- just a comment", "no SQL statement"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused_with_exit_2_and_changes_nothing(attack_env, capsys, attack):
    storage, secret, ce, tmp = attack_env
    sql, expected = ATTACKS[attack]
    before = tree_digest(Path(storage))
    code, out, err = cli(["query", "micro-test", sql.format(secret=secret, ce=ce, tmp=tmp), "--storage", storage], capsys)
    assert code == 2, (out, err)
    assert expected in err and err.count("\n") == 1, err
    assert "TOPSECRET" not in out + err
    assert tree_digest(Path(storage)) == before
    assert sorted(p.name for p in tmp.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("sql", [
    "select count(*) from ce",
    "  (select count(*) from ce)",
    "/* comment */ with x as (select * from ce) select count(*) from x; ",
    "-- first\nselect 1; select count(*) from ce",
    "from ce select count(*)",
    "describe ce",
    "show tables",
    "summarize scores",
    "explain select * from ce",
    "EXPLAIN ANALYZE select count(*) from predictions",
])
def test_reads_still_work(micro_run, capsys, sql):
    storage, _ = micro_run
    code, out, err = cli(["query", "micro-test", sql, "--storage", storage, "--format", "csv"], capsys)
    assert code == 0, err
    assert len(out.splitlines()) >= 2


def test_the_connection_is_locked_down_with_a_memory_limit(micro_run, capsys):
    storage, _ = micro_run
    sql = ("select current_setting('enable_external_access'), current_setting('lock_configuration'), "
           "current_setting('memory_limit')")
    code, out, err = cli(["query", "micro-test", sql, "--storage", storage, "--format", "csv", "--memory-limit", "300MB"],
                         capsys)
    assert code == 0, err
    expected = duckdb.connect(config={"memory_limit": "300MB"}).execute("select current_setting('memory_limit')").fetchall()[0][0]
    assert out.splitlines()[1] == f"False,True,{expected}"


@pytest.mark.parametrize("sql, kind", [("COPY t TO 'x'", "COPY"), ("select 1; attach 'x'", "ATTACH"),
                                       ("explain (copy t to 'x')", None), ("call pragma_version()", "CALL")])
def test_check_read_only_uses_duckdbs_parser(sql, kind):
    with pytest.raises((QueryRefused, duckdb.Error)) as e:
        check_read_only(sql)
    if kind:
        assert f"refused {kind}" in str(e.value)
