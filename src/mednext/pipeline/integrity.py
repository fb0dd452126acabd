"""Images are read completely or refused.

Image readers fill what a file lacks with zeros: a ``.nii.gz`` cut off at 60% of its bytes reads
as a volume whose last 40% is black, and nothing says so. :func:`check_complete` reads the file's
own header and compares it with the bytes that follow, before the engine's reader sees the file:

- NIfTI-1/2 (``.nii``, ``.nii.gz``): ``vox_offset`` plus the voxel count times ``bitpix`` bytes
  must be present; a gzip stream must end with its end marker and a matching CRC-32.
- MetaImage (``.mha``, ``.mhd``): ``DimSize`` x ``ElementNumberOfChannels`` x the element size
  must be present; compressed data must be a complete zlib stream of that length.
- NRRD (``.nrrd``, ``.nhdr``): ``sizes`` x the type's size must be present (raw or gzip encoding).

Other formats (PNG, BMP, TIFF, GIPL) are left to their readers, which raise on a cut-off file.
:func:`check_file_finite` refuses NaN and infinite voxels, naming the file and how many there are
(NIfTI files are scanned from their bytes: SimpleITK reads NaN in them as 0).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednext.errors import ImageReadError

__all__ = ["check_complete", "check_file_finite", "check_finite"]

_CHUNK = 1 << 20
_META_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_NRRD_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t"), 8),
    "float": 4,
    "double": 8,
}  # fmt: skip


def _cut_off(path: Path, have: int, need: int) -> ImageReadError:
    return ImageReadError(
        f"{path}: the image data is cut off ({have} of the {need} bytes its header announces); the file was "
        "not copied or written completely: copy or export it again"
    )


def _gzip_length(path: Path, source: Path | None = None, offset: int = 0) -> int:
    """Decompressed length of the gzip stream starting at ``offset`` of ``source`` (default ``path``);
    an ImageReadError naming ``path`` when the stream ends early or its checksum does not match."""
    with open(source or path, "rb") as raw:
        raw.seek(offset)
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                total = 0
                while chunk := stream.read(_CHUNK):
                    total += len(chunk)
        except EOFError:
            raise ImageReadError(
                f"{path}: the compressed image data is cut off (the gzip stream ends before its end marker); the "
                "file was not copied or written completely: copy or export it again"
            ) from None
        except (gzip.BadGzipFile, zlib.error) as err:
            kind = "checksum" if "CRC" in str(err) or "length" in str(err) else "stream"
            raise ImageReadError(
                f"{path}: the compressed image data is damaged (gzip {kind} error: {err}); copy or export it again"
            ) from None
    return total


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header that locate the voxel data."""

    size: int
    endian: str
    datatype: int
    bitpix: int
    dims: tuple[int, ...]
    offset: int

    @property
    def voxels(self) -> int | None:
        """The voxel count, or None when the dimensions make no sense."""
        rank = self.dims[0]
        return math.prod(max(1, int(d)) for d in self.dims[1 : rank + 1]) if 1 <= rank <= 7 else None

    @property
    def data_start(self) -> int:
        return max(self.offset, self.size)


def _open_image(path: Path) -> Any:
    """``path`` opened for reading bytes, through gzip when it is compressed."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _nifti_size(head: bytes) -> tuple[str, int] | None:
    """(byte order, header size) when ``head`` starts a NIfTI-1/2 header, else None."""
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0] if len(head) >= 4 else 0
        if size in (348, 540):
            return endian, size
    return None


def _nifti_header(head: bytes, endian: str, size: int) -> _NiftiHeader:
    """The header's fields; ``head`` holds at least ``size`` bytes."""
    if size == 348:
        return _NiftiHeader(
            size, endian,
            datatype=struct.unpack(endian + "h", head[70:72])[0],
            bitpix=struct.unpack(endian + "h", head[72:74])[0],
            dims=struct.unpack(endian + "8h", head[40:56]),
            offset=int(struct.unpack(endian + "f", head[108:112])[0]),
        )  # fmt: skip
    return _NiftiHeader(
        size, endian,
        datatype=struct.unpack(endian + "h", head[12:14])[0],
        bitpix=struct.unpack(endian + "h", head[14:16])[0],
        dims=struct.unpack(endian + "8q", head[16:80]),
        offset=int(struct.unpack(endian + "q", head[168:176])[0]),
    )  # fmt: skip


def _nifti(path: Path) -> None:
    try:
        with _open_image(path) as fh:
            head = fh.read(540)
    except EOFError:
        raise ImageReadError(
            f"{path}: the file is cut off inside its NIfTI header; it was not copied or written completely: copy "
            "or export it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        raise ImageReadError(
            f"{path}: the NIfTI header cannot be read ({err}); copy or export the file again"
        ) from None
    if len(head) < 348:
        raise _cut_off(path, len(head), 348)
    kind = _nifti_size(head)
    if kind is None:
        return  # not a NIfTI header: leave the file to the reader, which refuses it with its own message
    if len(head) < kind[1]:
        raise _cut_off(path, len(head), kind[1])
    header = _nifti_header(head, *kind)
    if header.voxels is None or header.bitpix <= 0:
        return
    need = header.data_start + header.voxels * header.bitpix // 8
    have = _gzip_length(path) if path.name.lower().endswith(".gz") else path.stat().st_size
    if have < need:
        raise _cut_off(path, have, need)


def _text_header(path: Path, end: re.Pattern[bytes], limit: int = 1 << 16) -> tuple[str, int] | None:
    """The header text and the data's offset, or None when ``end`` is not found in the first ``limit`` bytes."""
    with open(path, "rb") as fh:
        head = fh.read(limit)
    found = end.search(head)
    if found is None:
        return None
    return head[: found.end()].decode("latin-1"), found.end()


def _metaimage(path: Path) -> None:
    header = _text_header(path, re.compile(rb"ElementDataFile\s*=\s*[^\r\n]*\r?\n"))
    if header is None:
        return
    text, offset = header
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip()
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        element = _META_SIZES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return
    need = math.prod(dims) * element
    source = fields.get("ElementDataFile", "LOCAL")
    if source != "LOCAL":
        if "%" in source or source.split()[0] == "LIST":
            return  # one file per slice: each is read by the reader
        path, offset = path.parent / source, 0
        if not path.is_file():
            raise ImageReadError(f"{path}: the image data file named by its header does not exist")
    if fields.get("CompressedData", "False").lower() != "true":
        have = path.stat().st_size - offset
        if have < need:
            raise _cut_off(path, have, need)
        return
    decompressor = zlib.decompressobj()
    have = 0
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(_CHUNK):
                have += len(decompressor.decompress(chunk))
                if decompressor.eof:
                    break
    except zlib.error as err:
        raise ImageReadError(f"{path}: the compressed image data is damaged ({err}); copy or export it again") from None
    if not decompressor.eof or have < need:
        raise _cut_off(path, have, need)


def _nrrd(path: Path) -> None:
    header = _text_header(path, re.compile(rb"\r?\n\r?\n"))
    if header is None:
        return
    text, offset = header
    fields = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        need = math.prod(int(v) for v in fields["sizes"].split()) * _NRRD_SIZES[fields["type"].lower()]
    except (KeyError, ValueError):
        return
    source = fields.get("data file") or fields.get("datafile")
    if source:
        if " " in source or "%" in source or source == "LIST":
            return
        path, offset = path.parent / source, 0
        if not path.is_file():
            raise ImageReadError(f"{path}: the image data file named by its header does not exist")
    encoding = fields.get("encoding", "raw").lower()
    if encoding == "raw":
        have = path.stat().st_size - offset
    elif encoding in ("gzip", "gz"):
        have = _gzip_length(path, offset=offset)
    else:
        return
    if have < need:
        raise _cut_off(path, have, need)


def check_complete(path: str | os.PathLike[str]) -> None:
    """Raise an ImageReadError naming ``path`` if its image data is shorter than its header says,
    or its compressed stream is cut off or fails its checksum (NIfTI, MetaImage, NRRD)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _nifti(p)
    elif name.endswith((".mha", ".mhd")):
        _metaimage(p)
    elif name.endswith((".nrrd", ".nhdr")):
        _nrrd(p)


def _nifti_float_voxels(path: Path) -> tuple[np.dtype, int, int] | None:
    """(dtype, data offset, voxel count) of a NIfTI file stored as float32/float64, else None."""
    with _open_image(path) as fh:
        head = fh.read(540)
    kind = _nifti_size(head)
    if kind is None or len(head) < kind[1]:
        return None
    header = _nifti_header(head, *kind)
    dtype = {16: "f4", 64: "f8"}.get(header.datatype)
    if dtype is None or header.voxels is None:
        return None
    return np.dtype(header.endian + dtype), header.data_start, header.voxels


def _nifti_non_finite(path: Path) -> tuple[int, int, int]:
    """(NaN count, infinite count, voxel count) of a float NIfTI file, read from its bytes: SimpleITK
    reads NaN in NIfTI files as 0, so its arrays cannot tell."""
    found = _nifti_float_voxels(path)
    if found is None:
        return 0, 0, 0
    dtype, offset, voxels = found
    nan = inf = 0
    step = (_CHUNK // dtype.itemsize) * dtype.itemsize
    with _open_image(path) as fh:
        fh.seek(offset)
        left = voxels * dtype.itemsize
        while left > 0 and (chunk := fh.read(min(step, left))):
            values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype=dtype)
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
            left -= len(chunk)
    return nan, inf, voxels


def check_file_finite(path: str | os.PathLike[str], action: str, array: np.ndarray | None = None) -> None:
    """Raise an ImageReadError naming ``path`` if the image holds NaN or infinite voxels.

    NIfTI files are scanned from their bytes (their reader turns NaN into 0); other formats through
    ``array`` (the image as read) when given, else read with SimpleITK when stored as floating point."""
    p = Path(path)
    if p.name.lower().endswith((".nii", ".nii.gz")):
        nan, inf, voxels = _nifti_non_finite(p)
        _raise_non_finite(p, nan, inf, voxels, action)
        return
    if array is None:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return  # not a SimpleITK format: the engine's reader reads it
        if "float" not in sitk.GetPixelIDValueAsString(reader.GetPixelID()):
            return
        array = sitk.GetArrayFromImage(reader.Execute())
    check_finite(array, p, action)


def _raise_non_finite(path: Path, nan: int, inf: int, voxels: int, action: str) -> None:
    if nan or inf:
        what = " and ".join(t for t, n in (("NaN", nan), ("infinite", inf)) if n)
        raise ImageReadError(
            f"{path}: {nan + inf} voxel(s) of {voxels} are {what} ({nan} NaN, {inf} infinite); {action}"
        )


def check_finite(array: np.ndarray, path: str | os.PathLike[str], action: str) -> None:
    """Raise an ImageReadError naming ``path`` if ``array`` holds NaN or infinite values; ``action``
    ends the message with what the user should do."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    _raise_non_finite(Path(path), nan, inf, int(array.size), action)
