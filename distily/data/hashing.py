"""Deterministic keys for data: content hashes that name caches, the train/eval hold-out, tokenizer fingerprints.

Every value is the same in every process, machine and Python version (no ``hash()``, no object identity).
"""

from __future__ import annotations

import hashlib
import json

# Bumped whenever packing (distily.data.packing, distily.data.synth_format) changes, so stale caches are never reused.
PACKING_VERSION = 1


def stable_hash(*parts: object) -> str:
    """A hex digest of ``parts`` that is the same in every process and Python version."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """Deterministic hold-out: a document is in the eval split iff the hash of its key falls below the fraction."""
    return eval_bucket(key) < eval_fraction


def eval_bucket(key: str) -> float:
    """Where ``key`` falls in [0, 1]: a document is held out for evaluation iff its bucket is below the fraction."""
    return int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids.

    Fast tokenizers serialise their whole pipeline (``backend_tokenizer.to_str()``); hashing the Python object
    itself is unreliable (its state changes as it is used), which would defeat the cache. For the same reason the
    truncation and padding settings are left out: a call with ``truncation=True`` leaves them set on the backend,
    and packing never truncates or pads.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        definition = json.dumps(pipeline, sort_keys=True)
    else:
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return stable_hash(type(tokenizer).__name__, definition, special)
