"""Immutable, content-addressed datasets of captured samples (docs/capture.md, "Datasets").

``<home>/datasets/<digest>/`` holds ``data.npz`` (one array per model input, named like it, batch
axis first; ``ids``, the samples' SHA-256s; ``y``, class indices, once labelled) and
``meta.json``. A captured dataset's digest is the SHA-256 of its sorted sample digests, one per
line; a labelled one's covers its parent's digest and its sorted ``id,class`` lines, so the same
samples (and labels) give the same digest on any machine, and a digest names one content forever.
A dataset directory is written under a temporary name and renamed into place: it exists whole or
not at all, and is never rewritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime import contract
from edgesmith.runtime.keys import edgesmith_home
from edgesmith.toolchain.capture import record
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.files import fsync

DATA_FILE = "data.npz"
META_FILE = "meta.json"
EXPERIMENT = "edgesmith-data"


def default_dir() -> Path:
    return edgesmith_home() / "datasets"


@dataclass
class CapturedDataset:
    digest: str
    path: Path
    meta: dict[str, Any]

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path / DATA_FILE, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    @property
    def labelled(self) -> bool:
        return self.meta["kind"] == "labelled"


def _write(root: Path, digest: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> CapturedDataset:
    final = root / digest
    if final.is_dir():
        return open_dataset(digest, root)
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".tmp-{uuid.uuid4().hex}"
    temp.mkdir()
    try:
        with open(temp / DATA_FILE, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(temp / META_FILE, "w") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync(temp)
        try:
            os.rename(temp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(temp)  # written meanwhile by another process: same digest, same content
        fsync(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return open_dataset(digest, root)


def open_dataset(name: str, root: Path | None = None) -> CapturedDataset:
    """A dataset by digest (or a unique prefix of at least 8 digits) or by its directory."""
    root = Path(root) if root else default_dir()
    path = Path(name)
    if not (path / META_FILE).is_file():
        matches = sorted(p for p in root.glob(f"{name}*") if p.is_dir() and not p.name.startswith(".")) \
            if len(name) >= 8 and all(c in "0123456789abcdef" for c in name) else []
        if len(matches) != 1:
            raise UserError(f"no single dataset {name!r} in {root}" + (f" ({len(matches)} match)" if matches else "")
                            + "; give a digest from `edgesmith capture pull` or `edgesmith data label`, or a dataset directory")
        path = matches[0]
    try:
        meta = json.loads((path / META_FILE).read_text())
        return CapturedDataset(meta["digest"], path, meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"dataset {path} is damaged ({path / META_FILE}: {e}); pull it again with `edgesmith capture "
                        "pull`, or label its parent again") from None


def parse_duration(text: str, option: str = "--since") -> int:
    """``30m``, ``1h``, ``7d``, ``90s`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise UserError(f"{option} {text!r} is not a duration; give e.g. 90s, 30m, 1h or 7d")
    return int(text[:-1]) * units[text[-1]]


def pull(store: CaptureStore, fleet: str, since_s: int | None = None, root: Path | None = None,
         now_s: float | None = None, model: str | None = None, captures: set[str] | None = None) -> CapturedDataset:
    """The samples of ``fleet`` received in the last ``since_s`` seconds (all when None) as a dataset;
    only those of the model whose manifest digest starts with ``model``, and of ``captures``, when given."""
    now_ms = int((now_s if now_s is not None else time.time()) * 1000)
    rows = store.samples(fleet, now_ms - since_s * 1000 if since_s is not None else 0)
    if model is not None:
        rows = [r for r in rows if r["manifest_sha256"].startswith(model.lower())]
    if captures is not None:
        rows = [r for r in rows if r["capture_id"] in captures]
    if not rows:
        raise UserError(f"no captured samples of fleet {fleet}" + (f" and model {model}" if model else "")
                        + (f" in capture {', '.join(sorted(captures))}" if captures else "")
                        + " were received" + (f" in the last {since_s} s" if since_s is not None else "")
                        + "; start a capture (`edgesmith capture start`) and let the devices upload (`capture upload`)")
    digest = hashlib.sha256("".join(f"{r['sha256']}\n" for r in rows).encode()).hexdigest()
    root = Path(root) if root else default_dir()
    if (root / digest).is_dir():
        return open_dataset(digest, root)
    parsed = []
    for r in rows:
        body = store.object_path(r["sha256"]).read_bytes()
        if record.sha256(body) != r["sha256"]:
            raise UserError(f"the stored capture {r['sha256']} does not match its digest; the store in {store.dir} "
                            "is damaged: remove that object and its row, or restore the store from a backup")
        parsed.append((r, body, record.parse(body)))
    layouts: dict[str, tuple[list, set[str]]] = {}  # model: (its samples' input layouts, their devices)
    for r, _, header in parsed:
        seen, devices = layouts.setdefault(r["manifest_sha256"], ([], set()))
        this = [(t.name, t.dtype, t.shape) for t in header.inputs]
        if this not in seen:
            seen.append(this)
        devices.add(r["device"])
    if len({json.dumps(lay) for seen, _ in layouts.values() for lay in seen}) > 1:
        # A model the receiver's artifact store lacks is not checked on upload: one device can send any
        # layout under it. Name every model's devices and layouts, so the odd one shows.
        said = "; ".join(f"model {m[:12]} from {', '.join(sorted(d))}: inputs {' or '.join(map(str, seen))}"
                         for m, (seen, d) in sorted(layouts.items()))
        raise UserError(f"the pulled samples have different inputs ({said}); pull one model's with --model MANIFEST")
    layout = [(t.name, t.dtype, t.shape) for t in parsed[0][2].inputs]
    columns: dict[str, list[np.ndarray]] = {}
    classes = None
    for r, body, header in parsed:
        for name, array in record.tensors(body, header).items():
            columns.setdefault(name, []).append(array.reshape(1, *array.shape[1:]) if array.shape[:1] == (1,) else array[None])
        if header.outputs and header.outputs[0].shape:
            classes = header.outputs[0].shape[-1]
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    arrays["ids"] = np.array([r["sha256"] for r in rows])
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    meta = {"digest": digest, "kind": "captured", "fleet": fleet, "samples": len(rows), "inputs": [n for n, _, _ in layout],
            "devices": sorted({r["device"] for r in rows}), "reasons": reasons, "classes": classes,
            "models": sorted({json.dumps({"model": r["model"], "version": r["model_version"],
                                          "manifest_sha256": r["manifest_sha256"]}, sort_keys=True) for r in rows}),
            "captures": sorted({r["capture_id"] for r in rows}),
            "time_range_ms": [min(r["ts_ms"] for r in rows), max(r["ts_ms"] for r in rows)], "parent": None}
    meta["models"] = [json.loads(m) for m in meta["models"]]
    return _write(root, digest, arrays, meta)


def input_digests(dataset: CapturedDataset, arrays: dict[str, np.ndarray] | None = None) -> list[str]:
    """Each sample's input digest: the SHA-256 of its inputs' raw bytes, every input in the model's
    order, little-endian, C order, back to back (exactly the record's input tensors), so a labelling
    source that knows the inputs (not the sample ids, which cover when and where it was served) can
    key its labels by content."""
    arrays = arrays if arrays is not None else dataset.arrays()
    columns = [np.ascontiguousarray(arrays[name]) for name in dataset.meta["inputs"]]
    return [hashlib.sha256(b"".join(c[n].tobytes() for c in columns)).hexdigest() for n in range(len(arrays["ids"]))]


def label(dataset: CapturedDataset, labels_csv: Path, classes: int | None = None, root: Path | None = None,
          skip_unknown: bool = False) -> CapturedDataset:
    """A new dataset of the samples ``labels_csv`` labels (rows ``key,class``; a header row
    ``id,class`` is allowed), with lineage to ``dataset``. A key is a sample id or an input digest
    (``input_digests``: it labels every sample with that input). Classes are indices below the
    model's class count (the dataset's, or ``classes``). Unknown keys (unless ``skip_unknown``:
    a labelling source that labels more than was captured), classes outside the model's and
    duplicates are refused, naming the first bad line."""
    if dataset.labelled:
        raise UserError(f"dataset {dataset.digest} is already labelled; label its parent {dataset.meta['parent']}")
    count = classes or dataset.meta.get("classes")
    arrays = dataset.arrays()
    ids = [str(i) for i in arrays["ids"]]
    position = {sid: n for n, sid in enumerate(ids)}
    by_input: dict[str, list[str]] = {}
    for sid, digest in zip(ids, input_digests(dataset, arrays)):
        by_input.setdefault(digest, []).append(sid)
    chosen: dict[str, int] = {}
    keys: set[str] = set()
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which is not part of the first id.
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                if line == 1 and [c.strip().lower() for c in row] in (["id", "class"], ["sample", "class"], ["sample_id", "class"]):
                    continue
                where = f"{labels_csv} line {line}"
                if len(row) != 2:
                    raise UserError(f"{where} has {len(row)} fields; each line is: sample id,class")
                key, cls = row[0].strip(), row[1].strip()
                samples = [key] if key in position else by_input.get(key.lower(), [])
                if not samples:
                    if skip_unknown:
                        continue
                    raise UserError(f"{where}: {key!r} is neither a sample id nor an input digest of dataset "
                                    f"{dataset.digest[:12]}; use the ids from its data.npz (ids) or `edgesmith capture "
                                    "pull --json`, or the SHA-256 of a sample's input bytes")
                if key.lower() in keys or any(sid in chosen for sid in samples):
                    raise UserError(f"{where}: sample {samples[0]} is labelled twice (by its id or its input "
                                    "digest); keep one line per sample or input")
                keys.add(key.lower())
                # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
                if not (cls.isascii() and cls.isdigit()) or int(cls) >= (count or contract.MAX_CLASSES):
                    raise UserError(f"{where}: class {cls!r} is not one of the model's classes "
                                    f"(0..{count - 1 if count else 'N-1'}); give the class index")
                chosen.update((sid, int(cls)) for sid in samples)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read labels {labels_csv} ({e}); give a CSV file of 'sample id,class' lines") from None
    if not chosen:
        raise UserError(f"{labels_csv} labels no sample; each line is: sample id,class")
    keep = sorted(position[sid] for sid in chosen)
    lines = sorted(f"{sid},{cls}\n" for sid, cls in chosen.items())
    digest = hashlib.sha256(f"labelled\n{dataset.digest}\n{''.join(lines)}".encode()).hexdigest()
    out = {k: v[keep] for k, v in arrays.items()}
    out["y"] = np.array([chosen[ids[i]] for i in keep], dtype=np.int64)
    meta = {**dataset.meta, "digest": digest, "kind": "labelled", "parent": dataset.digest, "samples": len(keep),
            "classes": count, "labels": str(Path(labels_csv).name)}
    return _write(Path(root) if root else dataset.path.parent, digest, out, meta)


def log_to_mlflow(dataset: CapturedDataset, tracking_uri: str | None = None) -> str:
    """An MLflow run (experiment ``edgesmith-data``) with the dataset as its input; returns the run id."""
    import mlflow

    from edgesmith.toolchain.train import tracking

    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.connect(uri)
    experiment = tracking.experiment_id(client, EXPERIMENT, uri)
    arrays = dataset.arrays()
    x = arrays[dataset.meta["inputs"][0]]
    with mlflow.start_run(experiment_id=experiment, run_name=f"{dataset.meta['kind']}-{dataset.digest[:12]}") as run:
        mlflow.set_tags({"edgesmith.kind": f"dataset.{dataset.meta['kind']}", tracking.TAG_DATASET: dataset.digest,
                         "edgesmith.fleet": dataset.meta["fleet"], "edgesmith.devices": ",".join(dataset.meta["devices"]),
                         "edgesmith.parent_dataset": dataset.meta.get("parent") or ""})
        mlflow.log_input(mlflow_dataset(dataset, x, arrays.get("y")), context=dataset.meta["kind"])
        mlflow.log_dict(dataset.meta, "dataset/meta.json")
    return run.info.run_id


def mlflow_dataset(dataset: CapturedDataset, x: np.ndarray, y: np.ndarray | None):
    import mlflow

    return mlflow.data.from_numpy(x, targets=y, source=str(dataset.path.resolve()),
                                  name=f"capture-{dataset.digest[:12]}", digest=dataset.digest[:16])
