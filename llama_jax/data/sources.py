"""Text sources through `datasets`: local text/json/jsonl/parquet files or hub names."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message names the file, record and field."""


_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_texts(spec: str | list[str], text_field: str = "text", split: str = "train"):
    """A `datasets.Dataset` with a column `text_field` from local files or a hub dataset name."""
    import datasets

    specs = expand(spec)
    local = [Path(s) for s in specs]
    if all(p.suffix in _BUILDERS for p in local):
        for p in local:
            if not p.exists():
                raise DataError(f"{p}: data file not found")
            if p.stat().st_size == 0:
                raise DataError(f"{p}: data file is empty")
        kinds = {_BUILDERS[p.suffix] for p in local}
        if len(kinds) > 1:
            raise DataError(f"mixed file types {sorted(kinds)} in one source: {specs}")
        builder = kinds.pop()
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in local], split="train")
        if builder == "text":
            text_field_here = "text"
        else:
            text_field_here = text_field
    else:  # a hub name (online users) or a local dataset directory
        ds = datasets.load_dataset(specs[0], split=split)
        text_field_here = text_field
    if len(ds) == 0:
        raise DataError(f"{', '.join(specs)}: the dataset is empty")
    if text_field_here not in ds.column_names:
        raise DataError(f"{', '.join(specs)}: record 0 has no field '{text_field_here}' "
                        f"(fields: {', '.join(ds.column_names)}); set data.text_field")
    for i, v in enumerate(ds[text_field_here][:1000]):
        if not isinstance(v, str):
            raise DataError(f"{', '.join(specs)}: record {i}: field '{text_field_here}' is {type(v).__name__}, "
                            "expected a string")
    return ds.rename_column(text_field_here, "text") if text_field_here != "text" else ds


def expand(spec: str | list[str]) -> list[str]:
    """File lists may hold glob patterns; a pattern matching nothing is an error, not an empty set."""
    import glob

    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError("no data files given")
    out = []
    for s in specs:
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise DataError(f"{s}: no files match this pattern")
            out.extend(hits)
        else:
            out.append(s)
    return out


def fingerprint_files(paths) -> str:
    """Content hash of local files (hub datasets: the name), for cache keys."""
    h = hashlib.sha256()
    for p in sorted(map(str, expand(list(paths)))):
        h.update(p.encode())
        if os.path.exists(p):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
