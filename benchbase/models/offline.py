"""Building blocks for models made offline (the tiny and mini worlds, test stand-ins).

- ``cache_root()``: where built model folders live (``$BENCHBASE_CACHE``, default
  ``~/.cache/benchbase``);
- ``build_folder_once``: build a model folder once, atomically, safe under concurrent builds;
- ``build_clip_tokenizer``: the real 49,408-token CLIP BPE as a ``CLIPTokenizer``, converted
  from the vocabulary open_clip ships (no download), so token ids match real CLIP.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408


def cache_root() -> Path:
    return Path(os.environ.get("BENCHBASE_CACHE", Path.home() / ".cache" / "benchbase"))


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable character table, in its insertion order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json + merges.txt of the real CLIP BPE from open_clip's bundled vocabulary."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    n_merges = VOCAB_SIZE - 256 * 2 - 2  # 48,894 merges after the header line
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


def build_clip_tokenizer(folder: Path, pad_token: str = "!"):
    """CLIPTokenizer with real CLIP ids. ``pad_token``: "!" as SD-2.x configs, EOS as SD-1.x."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, bos_token=BOS, eos_token=EOS,
                                         unk_token=EOS, model_max_length=77)


def build_folder_once(folder: Path, build, config: dict, marker: str = "benchbase_tiny.json") -> Path:
    """Build a model folder once: ``build(tmp)`` fills a temporary folder that is renamed into
    place with ``marker`` (the config) written last, so concurrent or killed builds never leave
    a half folder. Deterministic builds make a lost race harmless."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        build(tmp)
        (tmp / marker).write_text(json.dumps(config, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: its folder is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
