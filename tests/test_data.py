"""Text sources and token windows, offline, with a tiny byte-level BPE tokenizer."""

import json
import sysconfig

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lm_superposition.data import (
    PAD_DOC_ID,
    TokenWindows,
    load_texts,
    offline_corpus_files,
    token_windows,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a sparse autoencoder reads the residual stream",
    "superposition packs more features than neurons",
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained on three sentences: any text tokenizes, and fast."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", pad_token="<pad>", eos_token="<eos>")


def n_text_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def documents(n):
    return [f"document {i}: " + SENTENCES[i % 3] * (1 + i % 4) for i in range(n)]


# ---------------------------------------------------------------- token windows


def test_windows_have_context_length_and_start_with_bos(tokenizer):
    windows = token_windows(documents(30), tokenizer, context_size=16, seed=0)
    assert windows.tokens.shape[1] == 16 and len(windows) > 10
    assert windows.tokens.dtype == windows.doc_ids.dtype == torch.long
    assert (windows.tokens[:, 0] == tokenizer.bos_token_id).all()


def test_unshuffled_windows_are_the_documents_in_order_with_their_ids(tokenizer):
    texts = documents(12)
    windows = token_windows(texts, tokenizer, context_size=16, shuffle=False)
    measured = windows.measured_mask
    # measured tokens, read row by row, are the documents' tokens concatenated
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert windows.tokens[measured].tolist() == expected
    # each document's tokens carry its index, ids increase along the stream
    expected_ids = [i for i, text in enumerate(texts) for _ in range(n_text_tokens(tokenizer, text))]
    assert windows.doc_ids[measured].tolist() == expected_ids
    # a BOS belongs to the document that follows it
    for row_tokens, row_ids in zip(windows.tokens, windows.doc_ids):
        bos_positions = (row_tokens == tokenizer.bos_token_id).nonzero().flatten().tolist()
        for pos in bos_positions:
            if pos + 1 < len(row_ids) and row_ids[pos + 1] != PAD_DOC_ID:
                assert row_ids[pos] == row_ids[pos + 1]
    assert windows.n_documents == len(texts)


def test_every_document_starts_with_bos(tokenizer):
    texts = documents(8)
    windows = token_windows(texts, tokenizer, context_size=64, shuffle=False)
    flat_tokens, flat_ids = windows.tokens.flatten(), windows.doc_ids.flatten()
    for doc in range(len(texts)):
        first = (flat_ids == doc).nonzero()[0].item()
        assert flat_tokens[first] == tokenizer.bos_token_id


def test_budget_is_exact_and_last_window_padded(tokenizer):
    windows = token_windows(documents(40), tokenizer, context_size=16, token_budget=101, seed=3)
    assert windows.n_tokens == 101
    padding = windows.doc_ids == PAD_DOC_ID
    assert padding.any()  # 101 tokens do not fill whole windows
    assert (windows.tokens[padding] == tokenizer.pad_token_id).all()
    assert windows.pad_token_id == tokenizer.pad_token_id


def test_budget_stops_reading_the_text_iterator(tokenizer):
    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield SENTENCES[i % 3]
            i += 1

    windows = token_windows(endless(), tokenizer, context_size=16, token_budget=50)
    assert windows.n_tokens == 50
    enough = needed = 0
    for text in SENTENCES * 100:
        enough += n_text_tokens(tokenizer, text)
        needed += 1
        if enough >= 50:
            break
    assert len(read) == needed


def test_same_seed_same_windows_other_seed_other_order(tokenizer):
    texts = documents(40)
    a = token_windows(texts, tokenizer, context_size=16, seed=7)
    b = token_windows(texts, tokenizer, context_size=16, seed=7)
    c = token_windows(texts, tokenizer, context_size=16, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)
    assert not torch.equal(a.tokens, c.tokens)
    # the same windows, only reordered
    assert sorted(map(tuple, a.tokens.tolist())) == sorted(map(tuple, c.tokens.tolist()))


def test_slicing_and_indexing_keep_windows(tokenizer):
    windows = token_windows(documents(20), tokenizer, context_size=16, seed=0)
    part = windows[2:5]
    assert isinstance(part, TokenWindows) and len(part) == 3
    assert torch.equal(part.tokens, windows.tokens[2:5]) and torch.equal(part.doc_ids, windows.doc_ids[2:5])
    assert part.bos_token_id == windows.bos_token_id and part.pad_token_id == windows.pad_token_id
    assert torch.equal(windows[-1].tokens, windows.tokens[-1:])
    assert sum(windows[i : i + 4].n_tokens for i in range(0, len(windows), 4)) == windows.n_tokens


def test_literal_bos_text_is_not_a_document_boundary(tokenizer):
    windows = token_windows(["one <bos> two"], tokenizer, context_size=32, shuffle=False)
    assert (windows.tokens == tokenizer.bos_token_id).sum() == 1
    assert windows.n_tokens == len(
        tokenizer("one <bos> two", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )


def test_without_bos_windows_are_plain_chunks(tokenizer):
    texts = documents(10)
    windows = token_windows(texts, tokenizer, context_size=16, prepend_bos=False, shuffle=False)
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert windows.bos_token_id is None
    assert windows.tokens[windows.measured_mask].tolist() == expected
    assert windows.n_tokens == len(expected)


def test_max_documents_limits_documents(tokenizer):
    windows = token_windows(documents(30), tokenizer, context_size=16, max_documents=5)
    assert windows.n_documents == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context_size": 1}, "context_size"),
        ({"token_budget": 0}, "token_budget"),
        ({"token_budget": 10_000}, "ran out"),
        ({"max_documents": 0}, "max_documents"),
    ],
)
def test_bad_window_arguments(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_windows(documents(3), tokenizer, **kwargs)


def test_empty_corpus_and_non_strings(tokenizer):
    with pytest.raises(ValueError, match="no tokens"):
        token_windows(["", ""], tokenizer)
    with pytest.raises(TypeError, match="strings"):
        token_windows([b"bytes"], tokenizer)


# ---------------------------------------------------------------- text sources


@pytest.fixture
def corpus_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first text file\n\nwith two paragraphs\n")
    (folder / "sub" / "b.txt").write_text("second text file\n")
    (folder / "c.jsonl").write_text("\n".join(json.dumps({"body": f"json doc {i}", "n": i}) for i in range(3)))
    pd.DataFrame({"body": ["parquet doc 0", "parquet doc 1"]}).to_parquet(folder / "d.parquet")
    (folder / "notes.md").write_text("not a supported type, ignored in folders")
    return folder


def test_txt_file_is_one_document(corpus_folder):
    assert list(load_texts(corpus_folder / "a.txt", seed=None)) == ["first text file\n\nwith two paragraphs\n"]


def test_jsonl_and_parquet_files_read_the_text_column(corpus_folder):
    jsonl = list(load_texts(corpus_folder / "c.jsonl", text_column="body", seed=None))
    assert jsonl == ["json doc 0", "json doc 1", "json doc 2"]
    parquet = list(load_texts(str(corpus_folder / "d.parquet"), text_column="body", seed=None, streaming=False))
    assert parquet == ["parquet doc 0", "parquet doc 1"]


def test_folder_reads_every_supported_file(corpus_folder):
    texts = list(load_texts(corpus_folder, text_column="body", seed=None))
    assert texts == [
        "json doc 0",
        "json doc 1",
        "json doc 2",
        "parquet doc 0",
        "parquet doc 1",
        "first text file\n\nwith two paragraphs\n",
        "second text file\n",
    ]


def test_seeded_shuffle_of_local_files(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    ordered = list(load_texts(path, seed=None))
    first = list(load_texts(path, seed=1))
    assert first == list(load_texts(path, seed=1))
    assert first != ordered and sorted(first) == sorted(ordered)
    assert first != list(load_texts(path, seed=2))


def test_dataset_name_goes_through_load_dataset(tmp_path, tokenizer):
    # the hub code path, offline: `load_dataset("json", data_files=...)` is a dataset name
    path = tmp_path / "hub_like.jsonl"
    path.write_text("\n".join(json.dumps({"content": SENTENCES[i % 3]}) for i in range(20)))
    texts = load_texts("json", data_files=str(path), text_column="content", seed=0)
    windows = token_windows(texts, tokenizer, context_size=16, token_budget=40)
    assert windows.n_tokens == 40


def test_saved_dataset_through_load_dataset(tmp_path):
    dataset = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(10)]})
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    texts = list(load_texts("parquet", data_files=str(tmp_path / "train.parquet"), seed=None))
    assert texts == [f"row {i}" for i in range(10)]


def test_missing_column_lists_the_columns(corpus_folder):
    with pytest.raises(ValueError, match=r"no column 'text'.*body"):
        list(load_texts(corpus_folder / "c.jsonl"))
    with pytest.raises(ValueError, match=r"no column 'text'.*body"):
        load_texts(corpus_folder / "d.parquet", streaming=False)


def test_bad_paths_give_clear_errors(corpus_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts("./no/such/folder")
    with pytest.raises(ValueError, match=r"unsupported file type '\.md'.*\.txt.*\.jsonl.*\.parquet"):
        load_texts(corpus_folder / "notes.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_texts(tmp_path / "empty")


def test_unreachable_hub_names_the_offline_options(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline corpus"):
        load_texts("monology/pile-uncopyrighted")


def test_offline_corpus_is_the_stdlib_in_seeded_order(tokenizer):
    files = offline_corpus_files()
    assert len(files) > 300 and files == sorted(files)
    assert all(str(path).startswith(sysconfig.get_paths()["stdlib"]) for path in files)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert not any({"test", "encodings"} & set(path.relative_to(stdlib).parts) for path in files)
    assert sum(path.stat().st_size for path in files) > 5_000_000  # a few million tokens

    first = [text[:200] for _, text in zip(range(20), load_texts(None, seed=0))]
    again = [text[:200] for _, text in zip(range(20), load_texts("offline", seed=0))]
    other = [text[:200] for _, text in zip(range(20), load_texts(None, seed=1))]
    assert first == again and first != other
    windows = token_windows(load_texts(None), tokenizer, context_size=64, token_budget=2_000)
    assert windows.n_tokens == 2_000
    # documents are top-level definitions, so a small sample spans several of them
    assert windows.n_documents >= 3  # 2,000 characters here; a whole stdlib file is ~17,000


def test_offline_documents_are_top_level_definitions_with_their_decorators(tmp_path):
    from lm_superposition.data import _top_level_pieces

    source = (
        '"""A module."""\nimport os\n\n\n@decorate\n@twice\ndef f():\n    return 1\n\n\n'
        "class C:\n    def method(self):\n        pass\n"
    )
    (tmp_path / "m.py").write_text(source)
    pieces = _top_level_pieces(tmp_path / "m.py")
    assert pieces == [
        '"""A module."""\nimport os\n\n\n',
        "@decorate\n@twice\ndef f():\n    return 1\n\n\n",
        "class C:\n    def method(self):\n        pass\n",
    ]
    assert "".join(pieces) == source
    (tmp_path / "bad.py").write_text("def broken(:\n")
    assert _top_level_pieces(tmp_path / "bad.py") == ["def broken(:\n"]
