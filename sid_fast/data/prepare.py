"""`prepare`: encode prompts (and images) once into webdataset shards (format.py).

Resumable: each shard is written as `shard-N.tar.tmp`, fsynced and renamed when full, then recorded in
`prepare-state.json` with the input position it ends at; a rerun keeps the recorded shards, deletes anything else,
skips the inputs they cover and redoes the partial shard. `manifest.json` is written last.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.data.encoding import LatentEncoder, PromptEncoder, load_image
from sid_fast.data.format import (
    DTYPES,
    MANIFEST,
    TENSOR_EXT,
    TEXT_EXT,
    UNCONDITIONAL,
    ShardManifest,
    dtype_name,
    encode_tensors,
    sample_key,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from sid_fast.data.sources import BadRecord, ImagePair, count_images, count_prompts, read_image_pairs, read_prompts
from sid_fast.errors import InputError
from sid_fast.models.protocol import Conditioning

log = logging.getLogger(__name__)
STATE = "prepare-state.json"
MAX_LOGGED_BAD = 20


def stored(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors in the compact stored dtype; integer/bool tensors (masks) unchanged."""
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in tensors.items()}


@dataclass
class _Pending:
    raw_index: int
    text: str
    pixels: Tensor | None = None


class ShardSink:
    """Writes samples into numbered tars of `samples_per_shard`, recording each finished shard atomically."""

    def __init__(self, out_dir: str | Path, settings: dict, samples_per_shard: int):
        if samples_per_shard < 1:
            raise InputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        if (self.out_dir / MANIFEST).is_file():
            done = ShardManifest.load(self.out_dir)
            raise InputError(f"{self.out_dir} is already a finished shard directory ({done.count} samples for teacher "
                             f"{done.teacher_id!r}); choose another --out or delete it")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.settings = dict(settings, samples_per_shard=samples_per_shard)
        self.shards: list[dict] = []
        self.fields: dict[str, dict] | None = None
        self._writer, self._handle, self._in_shard = None, None, 0
        self._load_state()

    # ---------------------------------------------------------------- resume

    def _load_state(self) -> None:
        state_path = self.out_dir / STATE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            changed = sorted(k for k in set(state["settings"]) | set(self.settings) if state["settings"].get(k) != self.settings.get(k))
            if changed:
                raise InputError(f"{self.out_dir} holds an unfinished prepare with other settings ({', '.join(changed)}: "
                                 f"{[state['settings'].get(k) for k in changed]} there, {[self.settings.get(k) for k in changed]} now); "
                                 "use another --out or the same settings")
            self.shards, self.fields = state["shards"], state["fields"]
        elif any(self.out_dir.glob("shard-*.tar")):
            raise InputError(f"{self.out_dir} holds shards but no {STATE}: choose an empty --out directory")
        for shard in self.shards:
            path = self.out_dir / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise InputError(f"{path}: recorded as finished in {STATE} but missing or of another size; delete {self.out_dir} and prepare again")
        kept = {s["name"] for s in self.shards}
        for path in list(self.out_dir.glob("shard-*.tar*")):
            if path.name not in kept:  # the partial shard (or one renamed but not yet recorded): redone
                path.unlink()

    @property
    def inputs_done(self) -> int:
        """Raw input records covered by finished shards (good and bad)."""
        return self.shards[-1]["inputs_end"] if self.shards else 0

    @property
    def skipped_done(self) -> int:
        return self.shards[-1]["skipped_end"] if self.shards else 0

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards) + self._in_shard

    def _save_state(self) -> None:
        write_json_atomic(self.out_dir / STATE, {"settings": self.settings, "fields": self.fields, "shards": self.shards})

    # ---------------------------------------------------------------- writing

    def _check_fields(self, tensors: dict[str, Tensor], where: str) -> None:
        fields = {name: {"shape": list(value.shape), "dtype": dtype_name(value.dtype)} for name, value in tensors.items()}
        if self.fields is None:
            self.fields = fields
        elif fields != self.fields:
            raise ValueError(f"{where}: encoder output {fields} differs from the first samples' {self.fields}")

    def add(self, text: str, tensors: dict[str, Tensor], raw_index: int) -> None:
        """Append one sample (tensors without batch dim, already in the stored dtype) read from input record `raw_index`."""
        self._check_fields(tensors, f"input record {raw_index}")
        if self._writer is None:
            from webdataset import TarWriter

            path = self.out_dir / (shard_name(len(self.shards)) + ".tmp")
            self._handle = open(path, "wb")
            self._writer = TarWriter(self._handle, mtime=0)
        key = sample_key(self.count)
        self._writer.write({"__key__": key, TEXT_EXT: text, TENSOR_EXT: encode_tensors(tensors)})
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self.close_shard(raw_index)

    def close_shard(self, last_raw_index: int) -> None:
        """Finish the open shard: flush, fsync, rename into place, record it (with the input position it ends at)."""
        if self._writer is None:
            return
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        name = shard_name(len(self.shards))
        final = self.out_dir / name
        os.replace(self.out_dir / (name + ".tmp"), final)
        good = self.count
        self.shards.append({"name": name, "count": self._in_shard, "bytes": final.stat().st_size,
                            "sha256": sha256_file(final), "inputs_end": last_raw_index + 1,
                            "skipped_end": last_raw_index + 1 - good})
        self._writer, self._handle, self._in_shard = None, None, 0
        self._save_state()

    def finish(self, kind: str, teacher_id: str, unconditional: dict[str, Tensor], skipped: int, source: str,
               extra: dict) -> ShardManifest:
        """Write the unconditional embedding and the manifest (last); remove the resume state."""
        if self.fields is None:
            raise InputError(f"no usable input records in {source} ({skipped} skipped as bad)")
        expected = {n: f for n, f in self.fields.items() if n != "latents"}
        got = {n: {"shape": list(v.shape[1:]), "dtype": dtype_name(v.dtype)} for n, v in unconditional.items()}
        if got != expected or any(v.shape[0] != 1 for v in unconditional.values()):
            raise ValueError(f"unconditional embedding {got} (batch 1 expected) differs from the samples' {expected}")
        with open(self.out_dir / UNCONDITIONAL, "wb") as handle:
            handle.write(encode_tensors(unconditional))
        manifest = ShardManifest(kind=kind, teacher_id=teacher_id, count=self.count, fields=self.fields,
                                 shards=[{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in self.shards],
                                 unconditional_sha256=sha256_file(self.out_dir / UNCONDITIONAL),
                                 skipped=skipped, source=source, extra=extra)
        manifest.save(self.out_dir)
        (self.out_dir / STATE).unlink(missing_ok=True)
        return manifest


def _progress(total: int | None, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="rec", dynamic_ncols=True)


def _record_bad(bad: BadRecord, skipped: int, bar) -> int:
    if skipped < MAX_LOGGED_BAD:
        log.warning("skipping %s: %s", bad.where, bad.reason)
    bar.set_postfix(bad=skipped + 1, refresh=False)
    return skipped + 1


def _run(records: Iterable, sink: ShardSink, encode_batch, decode, batch_size: int, bar) -> int:
    """Feed input records through `decode` (-> _Pending or BadRecord) and `encode_batch` into `sink`; returns skipped count."""
    try:
        return _run_records(records, sink, encode_batch, decode, batch_size, bar)
    except BaseException:
        bar.leave = False  # clear the bar: the error that follows is printed on a line of its own
        bar.close()
        raise


def _run_records(records: Iterable, sink: ShardSink, encode_batch, decode, batch_size: int, bar) -> int:
    skipped, pending, last_raw = sink.skipped_done, [], -1
    bar.update(sink.inputs_done)

    def flush():
        for item, tensors in zip(pending, encode_batch(pending), strict=True):
            sink.add(item.text, tensors, item.raw_index)
        pending.clear()

    for raw_index, record in enumerate(records):
        if raw_index < sink.inputs_done:
            continue
        last_raw = raw_index
        bar.update(1)
        item = record if isinstance(record, BadRecord) else decode(raw_index, record)
        if isinstance(item, BadRecord):
            skipped = _record_bad(item, skipped, bar)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    sink.close_shard(last_raw)
    bar.close()
    return skipped


def _split(cond: Conditioning, dtype: torch.dtype) -> list[dict[str, Tensor]]:
    tensors = stored(cond.tensors(), dtype)
    return [{name: value[i] for name, value in tensors.items()} for i in range(len(cond))]


def prepare_prompts(source: str | Path, out_dir: str | Path, encoder: PromptEncoder, *, batch_size: int = 64,
                    samples_per_shard: int = 1000, dtype: str = "bfloat16", text_field: str | None = None,
                    progress: bool = True) -> ShardManifest:
    """Prompts file (.txt/.jsonl/.parquet) -> shards of text embeddings in `dtype` for `encoder.teacher_id`."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    store = DTYPES[dtype]
    settings = {"kind": "prompts", "teacher_id": encoder.teacher_id, "source": str(source), "dtype": dtype, "text_field": text_field}
    sink = ShardSink(out_dir, settings, samples_per_shard)
    bar = _progress(count_prompts(source), progress, "prepare prompts")
    skipped = _run(read_prompts(source, text_field), sink, lambda items: _split(encoder.encode([i.text for i in items]), store),
                   lambda raw_index, text: _Pending(raw_index, text), batch_size, bar)
    uncond = stored(encoder.unconditional().tensors(), store)
    return sink.finish("prompts", encoder.teacher_id, uncond, skipped, str(source), {"dtype": dtype})


def prepare_images(source: str | Path, out_dir: str | Path, prompt_encoder: PromptEncoder, latent_encoder: LatentEncoder,
                   *, batch_size: int = 16, samples_per_shard: int = 1000, dtype: str = "bfloat16",
                   latent_dtype: str = "float32", image_field: str | None = None, text_field: str | None = None,
                   progress: bool = True) -> ShardManifest:
    """Image+caption pairs -> shards of VAE latents (in `latent_dtype`) plus caption embeddings (in `dtype`)."""
    for name, value in (("dtype", dtype), ("latent_dtype", latent_dtype)):
        if value not in DTYPES:
            raise InputError(f"{name} {value!r}: expected one of {sorted(DTYPES)}")
    if prompt_encoder.teacher_id != latent_encoder.teacher_id:
        raise ValueError(f"prompt encoder is for teacher {prompt_encoder.teacher_id!r} but the latent encoder "
                         f"for {latent_encoder.teacher_id!r}")
    resolution = latent_encoder.resolution
    settings = {"kind": "images", "teacher_id": prompt_encoder.teacher_id, "source": str(source), "dtype": dtype,
                "latent_dtype": latent_dtype, "resolution": resolution, "image_field": image_field, "text_field": text_field}
    sink = ShardSink(out_dir, settings, samples_per_shard)

    def decode(raw_index: int, pair: ImagePair):
        try:
            return _Pending(raw_index, pair.caption, load_image(pair.image, resolution))
        except ValueError as error:
            return BadRecord(pair.where, str(error))

    def encode_batch(items: list[_Pending]) -> list[dict[str, Tensor]]:
        latents = latent_encoder.encode(torch.stack([i.pixels for i in items])).to(DTYPES[latent_dtype])  # (B, C, h, w)
        texts = _split(prompt_encoder.encode([i.text for i in items]), DTYPES[dtype])
        return [dict(t, latents=latents[i]) for i, t in enumerate(texts)]

    bar = _progress(count_images(source), progress, "prepare images")
    skipped = _run(read_image_pairs(source, image_field, text_field), sink, encode_batch, decode, batch_size, bar)
    uncond = stored(prompt_encoder.unconditional().tensors(), DTYPES[dtype])
    return sink.finish("images", prompt_encoder.teacher_id, uncond, skipped, str(source),
                       {"dtype": dtype, "latent_dtype": latent_dtype, "resolution": resolution})
