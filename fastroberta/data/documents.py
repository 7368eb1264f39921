"""Reading a corpus as a stream of documents.

A text file is split at blank lines (lines holding only whitespace), the convention of RoBERTa's fairseq data;
each line of a ``.jsonl`` file is one document (its ``"text"`` field); each row of a Hugging Face dataset
(``"hf:<name>[:config][:split]"``, needs the ``datasets`` package) is one. ``.gz`` files are read through gzip.
A folder contributes its ``.txt``, ``.text``, ``.md``, ``.rst`` and ``.jsonl`` files (sorted, recursively, hidden
entries skipped). Documents come out stripped, blank ones skipped. Files are streamed in blocks, so memory
stays flat whatever their size. Invalid UTF-8 is replaced by U+FFFD and counted in a warning.
"""
import codecs
import contextlib
import gzip
import json
import os
import re
import warnings

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
_BLOCK_BYTES = 1 << 22
_BLANK_LINES = re.compile(r"\n\s*\n")


def default_corpus_path():
    """The bundled Tiny Shakespeare corpus (public domain), the default when no corpus is named."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "tinyshakespeare.txt")


class _Replacements:
    """Counts invalid UTF-8 sequences replaced by U+FFFD (a codecs error handler is global, so is its count)."""
    count = 0

    @classmethod
    def handler(cls, exc):
        cls.count += 1
        return "\ufffd", exc.end


codecs.register_error("fastroberta.count_replace", _Replacements.handler)


def _kind(path):
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def resolve_sources(data):
    """The corpus as a list of (kind, location): kind "text", "jsonl" or "hf"."""
    if data is None:
        data = default_corpus_path()
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data is an empty list of corpus paths")
        return [src for item in data for src in resolve_sources(item)]
    if isinstance(data, str) and data.startswith("hf:"):
        _parse_hf(data)
        return [("hf", data)]
    path = os.fspath(data)
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus path not found: {path}")
    if os.path.isfile(path):
        return [(_kind(path) or "text", os.path.abspath(path))]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _kind(name):
                found.append((_kind(name), os.path.abspath(os.path.join(root, name))))
    if not found:
        raise ValueError(f"the folder {path} holds no corpus files (looked for "
                         f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, optionally .gz)")
    return found


def _parse_hf(spec):
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"a Hugging Face dataset is named 'hf:<name>[:config][:split]', got {spec!r}")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    return name, config, split


def _load_hf(spec):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {spec!r} needs the 'datasets' package (pip install datasets)") from None
    name, config, split = _parse_hf(spec)
    dataset = datasets.load_dataset(name, config, split=split)
    if "text" not in dataset.column_names:
        raise ValueError(f"{spec}: the dataset has no 'text' column (columns: {dataset.column_names})")
    return dataset


def corpus_fingerprint(sources):
    """What identifies the corpus for the cache: path, size and modification time of every file (cheap, and a
    rewritten file always changes its mtime), or the dataset's own fingerprint."""
    items = []
    for kind, where in sources:
        if kind == "hf":
            items.append([kind, where, getattr(_load_hf(where), "_fingerprint", None)])
        else:
            st = os.stat(where)
            items.append([kind, where, st.st_size, st.st_mtime_ns])
    return items


def corpus_bytes(sources):
    """Total size of the corpus files (None when a dataset is part of it), for progress and worker choice."""
    if any(kind == "hf" for kind, _ in sources):
        return None
    return sum(os.path.getsize(where) for _, where in sources)


@contextlib.contextmanager
def _open_binary(path, progress):
    raw = open(path, "rb")
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.lower().endswith(".gz") else raw
        done = [0]

        def report():
            position = raw.tell()
            if progress is not None and position > done[0]:
                progress(position - done[0])
            done[0] = position

        yield stream, report
    finally:
        raw.close()


def _text_documents(path, progress):
    decoder = codecs.getincrementaldecoder("utf-8")(errors="fastroberta.count_replace")
    carry = ""
    with _open_binary(path, progress) as (stream, report):
        while True:
            raw = stream.read(_BLOCK_BYTES)
            report()
            final = not raw
            text = carry + decoder.decode(raw, final=final)
            # A blank-line break can only start in the whitespace that ends the carried-over text, so the scan
            # starts there: a huge document without blank lines costs linear time, not quadratic.
            start = len(carry.rstrip())
            parts = _BLANK_LINES.split(text[start:])
            parts[0] = text[:start] + parts[0]
            carry = "" if final else parts.pop()
            for part in parts:
                part = part.strip()
                if part:
                    yield part
            if final:
                return


def json_error_place(exc, line):
    """Where on its line ``json.loads(line)`` failed, in words: a column, or the end of the line (what a missing
    closing brace or quote gives)."""
    if exc.pos >= len(line.rstrip()):
        return f"{exc.msg} at the end of the line: a closing brace or quote missing?"
    return f"{exc.msg} at column {exc.colno}"


def _jsonl_documents(path, progress):
    with _open_binary(path, progress) as (stream, report):
        for lineno, raw in enumerate(stream, 1):
            if lineno % 4096 == 0:
                report()
            line = raw.decode("utf-8", errors="fastroberta.count_replace")
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # else a missing closing brace is reported at "line 2, column 1"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({json_error_place(exc, line)})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f'{path}, line {lineno}: the record has no "text" field')
            text = record["text"]
            if not isinstance(text, str):
                raise ValueError(f'{path}, line {lineno}: "text" must be a string, got {type(text).__name__}')
            text = text.strip()
            if text:
                yield text
        report()


def _hf_documents(spec, progress):
    for lineno, row in enumerate(_load_hf(spec)):
        text = row["text"]
        if not isinstance(text, str):
            raise ValueError(f"{spec}, row {lineno}: 'text' must be a string, got {type(text).__name__}")
        text = text.strip()
        if text:
            if progress is not None:
                progress(len(text))
            yield text


def iter_documents(sources, progress=None, warn=True):
    """Every document of the corpus, in order, as a stripped non-empty string. Invalid UTF-8 is replaced by
    U+FFFD and, with ``warn``, counted in one UnicodeWarning per file."""
    readers = {"text": _text_documents, "jsonl": _jsonl_documents, "hf": _hf_documents}
    for kind, where in sources:
        _Replacements.count = 0
        yield from readers[kind](where, progress)
        if warn and _Replacements.count:
            warnings.warn(f"{where}: replaced {_Replacements.count} invalid UTF-8 byte sequence(s) with U+FFFD",
                          UnicodeWarning, stacklevel=2)
