"""Tokenizers by name: tiktoken BPE encodings loaded offline from cached ranks, and raw bytes.

`tiktoken.get_encoding("gpt2")` downloads its files on first use and fails behind a firewall.
Instead the GPT-2 ranks (tiktoken's own `r50k_base.tiktoken` format: base64 token, space, rank)
are fetched once from the PyPI sdist of openai-whisper, verified by sha256, cached, and the
`tiktoken.Encoding` is built here from them with GPT-2's pre-tokenization pattern.
`cl100k_base` and `o200k_base` ranks come the same way from the litellm wheel, on request.

Every tokenizer exposes `.name`, `.n_vocab`, `.eot`, `.encode(text)` (ordinary text: the
special-token string is not parsed as special) and `.decode(ids)`.
"""

import hashlib
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Protocol
from unittest import mock

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from gpt.data.assets import cache_dir, pip_download
from gpt.fileio import sha256_file, write_atomic

EOT_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    """What the trainer, the sampler and the evaluator need of a tokenizer."""

    name: str
    n_vocab: int  # every id is below it
    eot: int  # the end-of-text id: documents are separated by it

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# name -> (PyPI distribution, member inside it, sha256 of the ranks file). The litellm wheel
# ships tiktoken's files under the names tiktoken's own cache gives them (sha1 of the URL).
LITELLM = "litellm/litellm_core_utils/tokenizers/"
FETCHABLE = {
    "gpt2": (
        "openai-whisper==20250625",
        "whisper/assets/gpt2.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
    "cl100k_base": (
        "litellm==1.109.1",
        LITELLM + "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "litellm==1.109.1",
        LITELLM + "fb374d419588a4632f3f557e76b4b70aebbca790",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
NAMES = ("gpt2", "cl100k_base", "o200k_base", "bytes")


def ranks_path(name: str) -> Path:
    """Where the ranks file of encoding `name` lives in the cache."""
    return cache_dir() / "tokenizers" / f"{name}.tiktoken"


def fetch_ranks(name: str = "gpt2") -> Path:
    """Fetch, verify and cache the ranks of `name`; a no-op when the cached file verifies."""
    if name not in FETCHABLE:
        raise ValueError(f"encoding {name!r} cannot be fetched; fetchable: {sorted(FETCHABLE)}")
    path = ranks_path(name)
    spec, member, sha = FETCHABLE[name]
    if path.exists() and sha256_file(path) == sha:
        return path
    with tempfile.TemporaryDirectory() as tmp:
        # gpt2 comes from an sdist (a .tar.gz with a top folder), the others from a wheel.
        archive = pip_download(spec, Path(tmp), sdist=name == "gpt2")
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                if member not in wheel.namelist():
                    raise RuntimeError(f"{archive.name} has no member {member}")
                data = wheel.read(member)
        else:
            with tarfile.open(archive) as tar:
                # The sdist's top folder is `<name>-<version>/`; match on the rest of the path.
                found = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] == member]
                if not found:
                    raise RuntimeError(f"{archive.name} has no member */{member}")
                data = tar.extractfile(found[0]).read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise RuntimeError(f"{member} from {spec} has sha256 {got}, expected {sha}")
    write_atomic(path, data)
    return path


def _missing_ranks_message(name: str, path: Path) -> str:
    spec, member, _ = FETCHABLE[name]
    setup = "`make assets` or " if name == "gpt2" else ""
    how = (
        f"run {setup}`python -m gpt.data.assets {name}` where PyPI is reachable (it takes "
        f"{member} from {spec})"
    )
    return (
        f"tokenizer ranks for {name!r} not found or corrupt at {path} (sha256 must be "
        f"{FETCHABLE[name][2]}); {how}, or copy a verified file to that path. "
        f"The cache root is set by $GPT_CACHE_DIR."
    )


class BytesTokenizer:
    """UTF-8 bytes as tokens 0..255, plus end-of-text = 256. Needs no file."""

    name = "bytes"
    n_vocab = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids: list[int]) -> str:
        # Decode runs of bytes between end-of-text tokens, so a split UTF-8 sequence inside a
        # run is replaced the same way tiktoken does it.
        parts, run = [], []
        for i in ids:
            if i == self.eot:
                parts.append(bytes(run).decode("utf-8", errors="replace") + EOT_TEXT)
                run = []
            else:
                run.append(int(i))
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)


class TiktokenTokenizer:
    """A tiktoken `Encoding` behind the common tokenizer interface."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab
        self.eot = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # Same ids as encode_ordinary (no special tokens allowed, none rejected), straight into
        # a uint32 buffer: skips building a Python list, which holds the GIL.
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def _load_ranks(name: str) -> dict[bytes, int]:
    path = ranks_path(name)
    if not path.exists():
        raise RuntimeError(_missing_ranks_message(name, path))
    try:
        return tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=FETCHABLE[name][2])
    except ValueError as e:  # tiktoken raises ValueError on a hash mismatch
        raise RuntimeError(_missing_ranks_message(name, path)) from e


def _gpt2_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=_load_ranks("gpt2"),
        special_tokens={EOT_TEXT: 50256},
        explicit_n_vocab=50257,
    )


def _tiktoken_public_encoding(name: str) -> tiktoken.Encoding:
    # tiktoken's own constructor supplies the pattern and special tokens; only its download
    # is swapped for the verified cached file.
    ranks = _load_ranks(name)
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks):
        kwargs = getattr(openai_public, name)()
    return tiktoken.Encoding(**kwargs)


_CACHE: dict[str, object] = {}


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer called `name`: one of "gpt2", "cl100k_base", "o200k_base", "bytes".

    Never downloads: BPE ranks must already be in the cache (`python -m gpt.data.assets gpt2`).
    """
    if name not in NAMES:
        raise ValueError(f"unknown encoding {name!r}; valid: {', '.join(NAMES)}")
    if name not in _CACHE:
        if name == "bytes":
            _CACHE[name] = BytesTokenizer()
        elif name == "gpt2":
            _CACHE[name] = TiktokenTokenizer(_gpt2_encoding())
        else:
            _CACHE[name] = TiktokenTokenizer(_tiktoken_public_encoding(name))
    return _CACHE[name]
