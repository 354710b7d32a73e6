"""Class-index files: which synset and which name each class id has.

Accepted JSON forms (class id = position):
- ImageNet's ``{"0": ["n01440764", "tench"], "1": [...], ...}`` (keys 0..K-1);
- a list of ``[synset, name]`` pairs;
- a list of strings, each both the synset (for ``sample_subset``) and the name (for
  ``prepare_clip_embeddings``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from repa_fast.errors import InputError, MissingFileError


def load_class_index(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(synset, name)`` per class id, from a class-index JSON file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"class-index file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a JSON file ({err})") from None
    if isinstance(data, dict):
        try:
            ids = sorted(int(k) for k in data)
        except ValueError:
            raise InputError(f"{path}: keys must be class ids 0..K-1, got {sorted(data)[:5]}") from None
        if ids != list(range(len(ids))):
            raise InputError(f"{path}: class ids must be 0..{len(ids) - 1} without gaps")
        entries = [data[str(i)] for i in ids]
    elif isinstance(data, list):
        entries = data
    else:
        raise InputError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
    if not entries:
        raise InputError(f"{path}: no classes")
    classes = []
    for class_id, entry in enumerate(entries):
        if isinstance(entry, str):
            classes.append((entry, entry))
        elif isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(v, str) for v in entry):
            classes.append((entry[0], entry[1]))
        else:
            raise InputError(f"{path}: class {class_id} is {entry!r}; expected a string or [synset, name]")
    return classes
