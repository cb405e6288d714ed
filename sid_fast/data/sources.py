"""Input readers for `prepare`: prompts from .txt/.jsonl/.parquet; image+caption pairs from a folder, a .parquet
or existing webdataset tars. Each yields records in a fixed order, and a `BadRecord` (counted and skipped by
`prepare`) for an input it cannot use, so a resumed `prepare` sees exactly the same sequence."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sid_fast.data.format import SampleRecord, ShardDamage, read_members, scan_tar
from sid_fast.errors import InputError

TEXT_FIELDS = ("prompt", "caption", "text")
IMAGE_FIELDS = ("image", "jpg", "jpeg", "png", "webp")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class BadRecord:
    """An input record that cannot be used; `where` names file and line/row/key."""

    where: str
    reason: str


@dataclass(frozen=True)
class ImagePair:
    image: bytes
    caption: str
    where: str


def _pick(names, wanted: str | None, candidates: tuple[str, ...], path: Path, what: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{path}: no {what} field {wanted!r}; it has {sorted(names)}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise InputError(f"{path}: no {what} field among {list(candidates)}; it has {sorted(names)} (name one with --{what}-field)")


def _parquet_file(path: Path):
    """pq.ParquetFile(path), an InputError naming the file when it is not parquet."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable parquet file ({' '.join(str(error).split())})") from None


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow

    try:
        for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as error:
        raise InputError(f"{path}: unreadable parquet data ({' '.join(str(error).split())})") from None


def _parquet_columns(path: Path) -> list[str]:
    return list(_parquet_file(path).schema_arrow.names)


def text_lines(path: str | Path, what: str = "prompt file") -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, streamed; newlines as Python's universal newlines, a leading BOM
    dropped. A line that is not UTF-8 or holds a NUL byte (a binary file) is an InputError naming file and line."""
    path = Path(path)
    number = 0
    with open(path, "rb") as handle:
        for raw in handle:
            number += 1
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise InputError(f"{path}:{number}: binary data (a NUL byte at column {nul + 1}), not text: a {what} "
                                 "holds UTF-8 text")
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}): a {what} holds UTF-8 text") from None
            text = text[:-1] if text.endswith("\n") else text
            text = text[:-1] if text.endswith("\r") else text
            parts = text.split("\r")  # a lone CR ends a line too (universal newlines)
            for i, part in enumerate(parts):
                number += 1 if i else 0
                yield number, part


def count_prompts(path: str | Path) -> int | None:
    """Number of input records (an upper bound when some are bad), for the progress bar."""
    path = Path(path)
    if _prompt_file_suffix(path) == ".parquet":
        return _parquet_file(path).metadata.num_rows
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def read_prompts(path: str | Path, text_field: str | None = None) -> Iterator[str | BadRecord]:
    """Prompts from .txt (one a line), .jsonl (field `text_field`, default prompt/caption/text) or .parquet (column)."""
    path = Path(path)
    return _read_prompts(path, _prompt_file_suffix(path), text_field)


def _prompt_file_suffix(path: Path) -> str:
    """The suffix of a usable prompt file; an InputError naming it otherwise."""
    if path.is_dir():
        raise InputError(f"prompt file {path}: is a directory; give a .txt, .jsonl or .parquet file")
    if not path.is_file():
        raise InputError(f"prompt file {path}: does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise InputError(f"prompt file {path}: unsupported type {suffix or '(no suffix)'!r}; use .txt, .jsonl or .parquet")
    return suffix


def _read_prompts(path: Path, suffix: str, text_field: str | None) -> Iterator[str | BadRecord]:
    if suffix == ".txt":
        for number, text in text_lines(path):
            yield text if text.strip() else BadRecord(f"{path}:{number}", "empty line")
    elif suffix == ".jsonl":
        for number, line in text_lines(path, "jsonl prompt file"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRecord(f"{path}:{number}", f"invalid JSON ({error})")
                continue
            if not isinstance(record, dict):
                yield BadRecord(f"{path}:{number}", "not a JSON object")
                continue
            name = text_field or next((n for n in TEXT_FIELDS if n in record), TEXT_FIELDS[0])
            value = record.get(name)
            yield value if isinstance(value, str) and value.strip() else BadRecord(f"{path}:{number}", f"no non-empty string field {name!r}")
    else:
        column = _pick(_parquet_columns(path), text_field, TEXT_FIELDS, path, "text")
        for number, row in enumerate(_parquet_rows(path, [column])):
            value = row[column]
            yield value if isinstance(value, str) and value.strip() else BadRecord(f"{path}:row {number}", f"empty or null {column!r}")


def _image_folder(path: Path) -> Iterator[ImagePair | BadRecord]:
    images = sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not images:
        raise InputError(f"image folder {path}: holds no images ({', '.join(IMAGE_EXTS)})")
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            yield BadRecord(str(image), f"no caption file {caption.name} beside it")
            continue
        try:
            text = caption.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as error:
            yield BadRecord(str(image), f"caption file {caption.name} is not UTF-8 text ({error.reason} at byte {error.start})")
            continue
        yield ImagePair(image.read_bytes(), text, str(image))


def _image_parquet(path: Path, image_field: str | None, text_field: str | None) -> Iterator[ImagePair | BadRecord]:
    names = _parquet_columns(path)
    image_column = _pick(names, image_field, IMAGE_FIELDS, path, "image")
    text_column = _pick(names, text_field, TEXT_FIELDS, path, "text")
    for number, row in enumerate(_parquet_rows(path, [image_column, text_column])):
        where = f"{path}:row {number}"
        image, caption = row[image_column], row[text_column]
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes")
        if not isinstance(image, bytes) or not isinstance(caption, str):
            yield BadRecord(where, f"{image_column!r} is not bytes or {text_column!r} is not a string")
            continue
        yield ImagePair(image, caption, where)


def _caption_of(members: dict[str, bytes]) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="strict").strip()
    if "json" in members:
        record = json.loads(members["json"])
        return next((record[n] for n in TEXT_FIELDS if isinstance(record.get(n), str)), None)
    return None


def _image_tars(tars: list[Path]) -> Iterator[ImagePair | BadRecord]:
    for tar in tars:
        with open(tar, "rb") as handle:
            for item in scan_tar(tar):
                if isinstance(item, ShardDamage):
                    yield BadRecord(f"{tar} after {item.read} samples", item.reason)
                    continue
                assert isinstance(item, SampleRecord)
                where = f"{tar}:{item.key}"
                members = read_members(handle, item)
                image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                try:
                    caption = _caption_of(members)
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    yield BadRecord(where, f"unreadable caption ({error})")
                    continue
                if image_ext is None or caption is None:
                    yield BadRecord(where, f"needs an image ({'/'.join(IMAGE_EXTS)}) and a caption (txt/json); has {sorted(members)}")
                    continue
                yield ImagePair(members[image_ext], caption, where)


def image_input_kind(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if path.is_file() and path.suffix == ".tar":
        return "tars"
    if path.is_dir():
        return "tars" if any(path.glob("*.tar")) else "folder"
    if not path.exists():
        raise InputError(f"image input {path}: does not exist")
    raise InputError(f"image input {path}: expected a folder of images with .txt captions, a .parquet, a .tar, or a folder of .tar")


def read_image_pairs(path: str | Path, image_field: str | None = None, text_field: str | None = None) -> Iterator[ImagePair | BadRecord]:
    """Image+caption pairs from a folder (captions in `<stem>.txt` beside images), a .parquet, or webdataset tars."""
    path = Path(path)
    kind = image_input_kind(path)
    if kind == "parquet":
        return _image_parquet(path, image_field, text_field)
    if kind == "tars":
        return _image_tars([path] if path.is_file() else sorted(path.glob("*.tar")))
    return _image_folder(path)


def count_images(path: str | Path) -> int | None:
    path = Path(path)
    kind = image_input_kind(path)
    if kind == "parquet":
        return count_prompts(path)
    if kind == "folder":
        return sum(1 for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    return None
