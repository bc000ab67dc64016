#!/usr/bin/env python
"""Raw text corpora (BookCorpus, English Wikipedia) -> one passage per line, UTF-8 (``bookswiki_train``).

Inputs are text files or directories (searched recursively, files in sorted order). A document is a
file, or a ``<doc ...>`` ... ``</doc>`` block of WikiExtractor output (its first line, the title, is
dropped). Whitespace is normalised; each document is cut into sentences (after ``.``, ``!`` or ``?``
followed by a space) and consecutive sentences are packed into passages of at most ``--max-words``
words; a longer sentence is split at ``--max-words``. Passages never cross documents; passages shorter
than ``--min-words`` (headings, stray lines) are dropped. Undecodable bytes are replaced.

Resumable: each input file is converted to a part (``OUT.parts/NNNNNN.txt`` with a ``.done`` record of
the input's size and mtime and the options); complete parts are kept on a rerun, and the output is
assembled (atomically) once every part is done. An existing output is kept unless ``--overwrite``.
No checksum is published for these corpora.

Example::

    python datasets/prepare_text_corpus.py --input bookcorpus/ wiki_extracted/ \\
        --out datasets/bookswiki/train.txt
"""
import argparse
import json
import os
import re
import shutil
import sys
from typing import Iterator, List

from _prepare_common import (add_common_arguments, atomic_write_json, logger, outputs_complete, progress,
                             setup_logging)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text files or directories")
    parser.add_argument("--out", required=True, help="output text file (e.g. datasets/bookswiki/train.txt)")
    parser.add_argument("--max-words", type=int, default=100,
                        help="most words per passage (default 100, about 128 word-piece tokens)")
    parser.add_argument("--min-words", type=int, default=5, help="drop shorter passages (default 5)")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after assembling the output")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.min_words <= args.max_words:
        parser.error(f"need 1 <= --min-words <= --max-words, got {args.min_words} and {args.max_words}")
    return args


def input_files(inputs: List[str]) -> List[str]:
    """The input files: files as given, directories expanded recursively (sorted)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            for directory, subdirs, names in os.walk(path):
                subdirs.sort()
                files.extend(os.path.join(directory, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise FileNotFoundError(f"no input file under {inputs}")
    return files


def documents(lines: Iterator[str]) -> Iterator[str]:
    """Documents of a file: the whole file, or each WikiExtractor ``<doc>`` block without its title."""
    current: List[str] = []
    drop_title = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("<doc ") or stripped == "<doc>":
            if current:
                yield " ".join(current)
            current, drop_title = [], True
            continue
        if stripped == "</doc>":
            if current:
                yield " ".join(current)
            current, drop_title = [], False
            continue
        if not stripped:
            continue
        if drop_title:
            drop_title = False
            continue
        current.append(stripped)
    if current:
        yield " ".join(current)


def passages(document: str, max_words: int, min_words: int) -> Iterator[str]:
    """Packs the sentences of ``document`` into passages of at most ``max_words`` words."""
    current: List[str] = []
    for sentence in _SENTENCE_END.split(document):
        words = sentence.split()
        if len(current) + len(words) > max_words and len(current) >= min_words:
            yield " ".join(current)  # the passage ends at a sentence boundary
            current = []
        while len(current) + len(words) > max_words:  # a sentence longer than what is left: split it
            room = max_words - len(current)
            yield " ".join(current + words[:room])
            current, words = [], words[room:]
        current.extend(words)
    if len(current) >= min_words:
        yield " ".join(current)


def convert_file(path: str, part: str, max_words: int, min_words: int) -> int:
    """Writes the passages of one input file to ``part`` (atomically); returns their number."""
    count = 0
    tmp = f"{part}.tmp{os.getpid()}"
    with open(path, encoding="utf-8", errors="replace") as f, open(tmp, "w", encoding="utf-8") as out:
        for document in documents(f):
            for passage in passages(document, max_words, min_words):
                out.write(passage + "\n")
                count += 1
    os.replace(tmp, part)
    return count


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if outputs_complete([args.out], args.overwrite):
        return 0
    files = input_files(args.input)
    parts_dir = f"{args.out}.parts"
    os.makedirs(parts_dir, exist_ok=True)
    options = {"max_words": args.max_words, "min_words": args.min_words}
    total = 0
    for i, path in enumerate(progress(files, total=len(files), desc="text files", unit="file")):
        part = os.path.join(parts_dir, f"{i:06d}.txt")
        stat = os.stat(path)
        record = {"input": os.path.abspath(path), "size": stat.st_size, "mtime": stat.st_mtime, **options}
        done_file = f"{part}.done"
        if not args.overwrite and os.path.isfile(done_file) and os.path.isfile(part):
            with open(done_file, encoding="utf-8") as f:
                previous = json.load(f)
            if {k: previous.get(k) for k in record} == record:
                total += previous["passages"]
                continue
        record["passages"] = convert_file(path, part, args.max_words, args.min_words)
        atomic_write_json(done_file, record)
        total += record["passages"]
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for i in range(len(files)):
            with open(os.path.join(parts_dir, f"{i:06d}.txt"), "rb") as part:
                shutil.copyfileobj(part, out)
    os.replace(tmp, args.out)
    if not args.keep_parts:
        shutil.rmtree(parts_dir)
    logger.info("Wrote %s: %d passages from %d files", args.out, total, len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
