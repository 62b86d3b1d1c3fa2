"""Text sources -> fixed-length token windows.

Text sources (`load_texts`), each an iterator of document strings:

- a Hugging Face dataset name (e.g. ``monology/pile-uncopyrighted``), read with
  `datasets.load_dataset` (streaming by default) and shuffled with its seeded buffer;
- an existing local path: a ``.txt`` file (the whole file is one document), a ``.jsonl``/``.json``
  file (one document per record) or a ``.parquet`` file (one per row), or a folder holding such
  files (searched recursively; grouped by format, sorted by path). These also go through
  `datasets.load_dataset`, so they shuffle the same way;
- ``None``/``"offline"``: the offline corpus, the standard library's ``.py`` source files of the
  running Python, one top-level function or class (or a module's preamble) = one document.

Why the standard library for the offline corpus: it ships with every Python install, so the tool
does real work without the hub, and it is real text an LM has seen the like of: code with English
comments and docstrings (the Pile has a GitHub share). Its docstrings alone are too few tokens
(~0.45M), so whole sources are used: on Python 3.11, 611 files, 10.7M characters, 2.9M Gemma-3
tokens. Left out: test suites (some distributions do not ship them), the ``encodings`` codec
tables (generated hex tables, not language) and the machine-specific ``_sysconfigdata*`` files.
A document is one top-level function or class, or a module's preamble (~5.7k documents on
3.11), not a whole file: a file is ~4.7k tokens, so a sample of a few thousand tokens would
otherwise come from one or two modules and leave the bootstrap no documents to resample.
The documents are listed in sorted file order and then permuted by the seed, so the corpus
is the same on every run of the same Python version.

Token windows (`token_windows`) follow SAE-Lens: documents are concatenated, each starting with
BOS, and cut into windows of ``context_size`` that each start with BOS (SAE-Lens's
`concat_and_batch_sequences` does the cutting). Every token keeps the index of its document so
the metric can bootstrap over documents; padding has document index -1.

Counting convention: a *measured* token is one that is neither BOS nor padding, i.e. a token the
activation stage feeds to the SAEs. ``token_budget`` and ``TokenWindows.n_tokens`` both count
measured tokens, so ``n_tokens == token_budget`` exactly when a budget is given.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

OFFLINE_SOURCE = "offline"
# file suffix -> the `datasets` builder that reads it
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAD_DOC_ID = -1
_OFFLINE_EXCLUDED_DIRS = {"test", "tests", "idle_test", "encodings", "site-packages", "dist-packages"}


# ---------------------------------------------------------------- text sources


def load_texts(
    source: str | Path | None = None,
    *,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    seed: int | None = 0,
    streaming: bool = True,
    data_files: str | list[str] | None = None,
    shuffle_buffer: int = 10_000,
) -> Iterator[str]:
    """Documents from `source`: None/"offline", an existing local path, or a HF dataset name.

    ``seed=None`` keeps the source's own order. ``data_files`` is passed to `load_dataset`
    for builder names such as ``"json"``. A missing path, an unsupported file type or an
    unreachable hub raise here; a missing text column here or, if the dataset only knows its
    columns once read (streamed json), on the first ``next()``.
    """
    if source is None or source == OFFLINE_SOURCE:
        return offline_corpus(seed=seed)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"source must name a text source (a str or Path), got {type(source).__name__}; "
            "to measure documents you have in hand, pass them to token_windows as a list of strings"
        )
    path = Path(source).expanduser()
    if not path.exists() and ("\n" in str(source) or len(str(source)) > 300):
        raise ValueError(
            f"source {str(source)[:60]!r}... looks like the text of a document, not the name of a source; load_texts "
            "takes 'offline', a local file or folder, or a Hugging Face dataset name. To measure documents you "
            "have in hand, pass them to token_windows as a list of strings"
        )
    if path.exists():
        return _local_texts(
            path, text_column=text_column, seed=seed, streaming=streaming, shuffle_buffer=shuffle_buffer
        )
    if _looks_like_path(str(source)):
        raise FileNotFoundError(
            f"text source {str(source)!r} looks like a local path but does not exist; give an existing "
            f"file or folder ({', '.join(LOCAL_FORMATS)}), a Hugging Face dataset name, or None for "
            "the offline corpus"
        )
    dataset = _load_hub_dataset(str(source), config=config, split=split, streaming=streaming, data_files=data_files)
    return _dataset_texts(dataset, text_column, name=str(source), seed=seed, shuffle_buffer=shuffle_buffer)


def check_text_source(source: str | Path | None, **options) -> None:
    """Fail now, before any model loads, if `source` cannot give documents: the same errors
    `load_texts` raises (a missing path, an unsupported file, an unreachable hub), plus a
    ValueError if it gives none. Reads one document."""
    texts = load_texts(source, seed=None, **options)
    if next(iter(texts), None) is None:
        raise ValueError(f"text source {str(source)!r} holds no documents")


def offline_corpus(seed: int | None = 0) -> Iterator[str]:
    """The standard library's top-level definitions, one per document, in seeded order.

    A document is a module's preamble (docstring, imports) or one top-level function or class
    with its decorators (see the module docstring for why).
    """
    documents = list(_offline_documents())
    if seed is not None:
        random.Random(seed).shuffle(documents)
    return iter(documents)


@functools.lru_cache(maxsize=1)
def _offline_documents() -> tuple[str, ...]:
    # Parsing the whole standard library takes seconds: once per process is enough.
    return tuple(piece for path in offline_corpus_files() for piece in _top_level_pieces(path))


def _top_level_pieces(path: Path) -> list[str]:
    """Split one source file at its top-level def/class statements (decorators kept with them)."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        nodes = ast.parse(source).body
    except SyntaxError:  # not Python this interpreter parses: keep the file whole
        return [source]
    starts = sorted(
        {
            min([node.lineno] + [decorator.lineno for decorator in node.decorator_list]) - 1
            for node in nodes
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
    )
    lines = source.splitlines(keepends=True)
    bounds = [0] + [start for start in starts if start > 0] + [len(lines)]
    pieces = ("".join(lines[begin:end]) for begin, end in zip(bounds, bounds[1:]))
    return [piece for piece in pieces if piece.strip()]


def offline_corpus_files() -> list[Path]:
    """Sorted paths of the standard library files that make up the offline corpus."""
    files = []
    # os.walk rather than rglob: pruning skips walking site-packages, often inside the stdlib dir
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [name for name in subfolders if name not in _OFFLINE_EXCLUDED_DIRS]
        files += [
            Path(folder, name) for name in names if name.endswith(".py") and not name.startswith("_sysconfigdata")
        ]
    return sorted(files)


def _looks_like_path(source: str) -> bool:
    # Hub names look like "org/name"; these forms never do.
    return (
        source.startswith(("/", "./", "../", "~"))
        or source.endswith("/")
        or "\\" in source
        or Path(source).suffix.lower() in {*LOCAL_FORMATS, ".csv", ".gz", ".zst", ".arrow"}
    )


def _local_texts(
    path: Path, *, text_column: str, seed: int | None, streaming: bool, shuffle_buffer: int
) -> Iterator[str]:
    files = _supported_files(path)
    by_builder: dict[str, list[str]] = {}
    for file in files:
        by_builder.setdefault(LOCAL_FORMATS[file.suffix.lower()], []).append(str(file))
    sources = []
    for builder, builder_files in sorted(by_builder.items()):
        # .txt: the whole file is one document, in the "text" column
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(
            builder, data_files=builder_files, split="train", streaming=streaming, **options
        )
        column = "text" if builder == "text" else text_column
        sources.append(_dataset_texts(dataset, column, name=str(path), seed=seed, shuffle_buffer=shuffle_buffer))
    return (text for texts in sources for text in texts)


def _supported_files(path: Path) -> list[Path]:
    supported = ", ".join(LOCAL_FORMATS)
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(f"unsupported file type {path.suffix!r} for {path}; supported: {supported}")
        return [path]
    files = sorted(
        file
        for file in path.rglob("*")
        if file.is_file()
        and file.suffix.lower() in LOCAL_FORMATS
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"folder {path} holds no text files; supported: {supported}")
    return files


def _load_hub_dataset(
    name: str, *, config: str | None, split: str, streaming: bool, data_files: str | list[str] | None
):
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming, data_files=data_files)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach the Hugging Face hub for dataset {name!r}: {err}. Without the hub, "
            "pass a local .txt/.jsonl/.parquet file or folder, or None for the offline corpus"
        ) from err


def _dataset_texts(dataset, text_column: str, *, name: str, seed: int | None, shuffle_buffer: int) -> Iterator[str]:
    columns = dataset.column_names  # None for streamed json/text: checked on the first row then
    if columns is not None and text_column not in columns:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; its columns: {columns}")
    if seed is not None:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        else:
            dataset = dataset.shuffle(seed=seed)
    return _column_values(dataset, text_column, name)


def _column_values(dataset, text_column: str, name: str) -> Iterator[str]:
    for row in dataset:
        if text_column not in row:
            raise ValueError(f"dataset {name!r} has no column {text_column!r}; its columns: {sorted(row)}")
        yield row[text_column]


# ---------------------------------------------------------------- token windows


@dataclass
class TokenWindows:
    """Token windows and the document index of every token (-1 for padding)."""

    tokens: torch.Tensor  # long [n_windows, context]
    doc_ids: torch.Tensor  # long [n_windows, context]
    bos_token_id: int | None
    pad_token_id: int | None

    def __post_init__(self):
        if self.tokens.shape != self.doc_ids.shape or self.tokens.ndim != 2:
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)} and doc_ids {tuple(self.doc_ids.shape)} "
                "must both be [n_windows, context]"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TokenWindows:
        if isinstance(index, int):  # keep the window dimension
            index = slice(index, index + 1 if index != -1 else None)
        return TokenWindows(self.tokens[index], self.doc_ids[index], self.bos_token_id, self.pad_token_id)

    @classmethod
    def concat(cls, parts: Sequence[TokenWindows]) -> TokenWindows:
        """The windows of every part, in order (same context size and special tokens)."""
        if not parts:
            raise ValueError("nothing to concatenate: give at least one TokenWindows")
        first = parts[0]
        for part in parts[1:]:
            if (part.context_size, part.bos_token_id, part.pad_token_id) != (
                first.context_size,
                first.bos_token_id,
                first.pad_token_id,
            ):
                raise ValueError("TokenWindows to concatenate must share context size, BOS and padding tokens")
        return cls(
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.doc_ids for p in parts]),
            first.bos_token_id,
            first.pad_token_id,
        )

    @property
    def context_size(self) -> int:
        return self.tokens.shape[1]

    @property
    def measured_mask(self) -> torch.Tensor:
        """True for tokens that are neither BOS nor padding (the tokens the metric sees)."""
        mask = self.doc_ids != PAD_DOC_ID
        if self.bos_token_id is not None:
            mask &= self.tokens != self.bos_token_id
        return mask

    @property
    def n_tokens(self) -> int:
        """Number of measured tokens (not BOS, not padding)."""
        return int(self.measured_mask.sum())

    @property
    def n_documents(self) -> int:
        return int(torch.unique(self.doc_ids[self.doc_ids != PAD_DOC_ID]).numel())


def token_windows(
    texts: Iterable[str],
    tokenizer,
    context_size: int = 128,
    token_budget: int | None = None,
    seed: int = 0,
    prepend_bos: bool = True,
    shuffle: bool = True,
    max_documents: int | None = None,
) -> TokenWindows:
    """Tokenize `texts` with a Hugging Face tokenizer into windows of `context_size`.

    Reads `texts` only until `token_budget` measured tokens (or `max_documents` documents) are
    in hand; the last document is cut so the budget is exact, and the last window is padded.
    Document ids count documents in reading order; `shuffle` permutes windows with `seed`.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"texts must be a sequence or iterator of documents (e.g. a list of strings, or load_texts(...)), "
            f"got one string of {len(texts)} characters, which would make every character a document; "
            "wrap it in a list: [text]"
        )
    if context_size < (2 if prepend_bos else 1):
        raise ValueError(f"context_size must be at least {2 if prepend_bos else 1}, got {context_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be a positive number of tokens or None, got {token_budget}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive or None, got {max_documents}")
    bos = tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos is None:
        raise ValueError("the tokenizer has no BOS token; pass prepend_bos=False")
    pad = next(
        (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None), 0
    )

    documents = _budgeted_documents(_tokenize(texts, tokenizer), token_budget, max_documents)
    n_measured = sum(len(doc) for doc in documents)
    if n_measured == 0:
        raise ValueError("the text source gave no tokens (empty corpus or only empty documents)")
    if token_budget is not None and n_measured < token_budget:
        raise ValueError(
            f"the text source ran out after {n_measured} tokens, short of token_budget="
            f"{token_budget}; lower the budget or pass token_budget=None"
        )

    tokens, doc_ids = _cut_windows(documents, context_size, bos, pad)
    if shuffle:
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
        tokens, doc_ids = tokens[order], doc_ids[order]
    return TokenWindows(tokens, doc_ids, bos, pad)


def _tokenize(texts: Iterable[str], tokenizer) -> Iterator[torch.Tensor]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"documents must be strings, got {type(text).__name__}: {text!r:.80}")
        # split_special_tokens: a literal "<bos>" in the text is text, not a document boundary,
        # so BOS ids only ever mark where documents and windows start.
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        yield torch.tensor(ids, dtype=torch.long)


def _budgeted_documents(
    documents: Iterator[torch.Tensor], token_budget: int | None, max_documents: int | None
) -> list[torch.Tensor]:
    """Non-empty documents until the budget is met, the last one cut to meet it exactly."""
    kept: list[torch.Tensor] = []
    n_tokens = 0
    for doc in documents:
        if len(doc) == 0:
            continue
        if token_budget is not None:
            doc = doc[: token_budget - n_tokens]
        kept.append(doc)
        n_tokens += len(doc)
        # stop before pulling another document: streamed sources are huge
        if n_tokens == token_budget or len(kept) == max_documents:
            break
    return kept


def _cut_windows(
    documents: list[torch.Tensor], context_size: int, bos: int | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAE-Lens windows of the concatenated documents, with each token's document index.

    `concat_and_batch_sequences` returns tokens only, so the document of each token is found by
    following how many source tokens each window took: a window that does not start on a
    document's own BOS gets one BOS inserted (SAE-Lens's begin-of-batch token), which belongs to
    the document it continues. Its last incomplete window, which SAE-Lens drops, is padded here
    instead so that no budgeted token is lost.
    """
    sequences = [doc if bos is None else torch.cat([torch.tensor([bos]), doc]) for doc in documents]
    source_tokens = torch.cat(sequences)
    source_doc_ids = torch.cat([torch.full((len(seq),), i) for i, seq in enumerate(sequences)])

    windows, window_doc_ids = [], []
    cursor = 0
    for window in concat_and_batch_sequences(iter(sequences), context_size, begin_batch_token_id=bos):
        inserted = int(bos is not None and source_tokens[cursor].item() != bos)
        taken = slice(cursor, cursor + context_size - inserted)
        assert torch.equal(window[inserted:], source_tokens[taken]), "SAE-Lens windowing changed"
        windows.append(window)
        window_doc_ids.append(torch.cat([source_doc_ids[taken][:inserted], source_doc_ids[taken]]))
        cursor = taken.stop

    if cursor < len(source_tokens):
        inserted = int(bos is not None and source_tokens[cursor].item() != bos)
        rest = source_tokens[cursor:]
        n_pad = context_size - inserted - len(rest)
        prefix = torch.tensor([bos] * inserted, dtype=torch.long)
        windows.append(torch.cat([prefix, rest, torch.full((n_pad,), pad)]))
        rest_ids = source_doc_ids[cursor:]
        window_doc_ids.append(torch.cat([rest_ids[:inserted], rest_ids, torch.full((n_pad,), PAD_DOC_ID)]))
    return torch.stack(windows).long(), torch.stack(window_doc_ids).long()
