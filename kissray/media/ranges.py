"""The range reader: a remote film read by byte ranges through one block cache, without copying it.

An ISO media file (MP4, MOV, M4V, 3GP) is a list of boxes: ``moov`` holds the index of every
sample (its time, size, byte offset, keyframe flag) and ``mdat`` the samples themselves. So:

- the frame index (:mod:`kissray.media.demux`) is read with the media data *blanked*: reads that fall
  inside ``mdat`` return zeros without touching the store, everything else is fetched. FFmpeg's own
  MP4 demuxer then lists every packet (edit lists, composition offsets, keyframes) from ``moov``
  alone; the first packets are checked against their real bytes before the index is believed;
- a window's stills and audio read only their byte ranges, through one block cache per film
  (``BLOCK_BYTES`` blocks, least recently used dropped; metadata fetched once and kept). Audio
  reads that are not in a cached block fetch just what was asked: audio samples are interleaved
  with video, and pulling whole blocks for them would read the video twice.

Other containers (Matroska, MPEG-TS, AVI, ...) list their frames only in the data, so they are
staged once per node instead (:mod:`kissray.media.source` decides, :mod:`kissray.media.stage_cache`
copies). How a reader treats media data is its :class:`ReadPolicy`. ``bytes_read`` counts what was fetched.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import enum
import io
import math
import os
import struct
import threading

from kissray.errors import StorageError
from kissray.uris import object_version

BLOCK_BYTES = 1 << 20  # one ranged GET of video: ~3 s of 3 Mbit/s film
READ_AHEAD_BLOCKS = 2  # fetched in the background ahead of the decoder (a window's end reads this many more)
CACHE_BYTES = 64 << 20  # media blocks kept per film and process: a 32-clip group of 16 Mbit/s video,
# so that the group's audio (read after its stills) comes from the blocks its video read
MAX_RECENT_RANGES = 32  # exact ranges kept (FFmpeg's reads of one film: 32 KiB each)
HEAD_BYTES = 64 << 10  # read with each top-level box header (the next header, or a whole small moov)
ISO_BOX_TYPES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"sidx", b"moof"}
MAX_TOP_LEVEL_BOXES = 64  # a plain MP4 has a handful (a fragmented one is staged: its moov says so)
MAX_METADATA_BYTES = 64 << 20  # a metadata region is fetched whole only up to this (a huge ``free`` box is not)
CHECKED_PACKETS = 8  # packets of the blanked index compared with their real bytes (the first keyframe on)


class NotRangeReadable(Exception):
    """This object cannot be read by ranges (not an ISO media file, or no usable box layout)."""


class ReadPolicy(enum.Enum):
    """How a reader of a remote film treats its media data (metadata is always fetched and kept)."""

    BLANKED = "blanked"  # media data reads as zeros, nothing fetched: listing the packets from moov
    BLOCKS = "blocks"  # whole cached blocks, read ahead: a window's video, decoded forward
    RANGES = "ranges"  # exactly the bytes asked for, where not in a cached block: audio, checks


def iso_boxes(fetch, size: int) -> list[tuple[bytes, int, int, int]]:
    """(type, start, payload start, end) of the top-level boxes, from their 8- or 16-byte headers."""
    boxes, pos = [], 0
    while pos + 8 <= size:
        head = fetch(pos, min(size, pos + 16))
        length, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if length == 1 and len(head) >= 16:
            length, header = struct.unpack(">Q", head[8:16])[0], 16
        elif length == 0:
            length = size - pos
        if (kind not in ISO_BOX_TYPES and not (boxes and kind.isalnum())) or length < header:
            raise NotRangeReadable(f"no ISO media box at byte {pos}")
        boxes.append((kind, pos, pos + header, min(size, pos + length)))
        if kind == b"moov" and _fragmented(fetch, pos + header, min(size, pos + length)):
            raise NotRangeReadable("a fragmented MP4 (its frames are listed in its fragments)")
        if len(boxes) > MAX_TOP_LEVEL_BOXES:
            raise NotRangeReadable(f"more than {MAX_TOP_LEVEL_BOXES} top-level boxes")
        pos += length
    if not any(box[0] == b"moov" for box in boxes):
        raise NotRangeReadable("no moov box")
    return boxes


def _fragmented(fetch, start: int, end: int) -> bool:
    """Whether the moov payload [start, end) has an ``mvex`` box (movie fragments follow)."""
    pos = start
    while pos + 8 <= end:
        length, kind = struct.unpack(">I4s", fetch(pos, pos + 8))
        if kind == b"mvex":
            return True
        if length == 1:
            length = struct.unpack(">Q", fetch(pos + 8, pos + 16))[0]
        if length < 8:
            return False
        pos += length
    return False


class RangeSource:
    """One remote object read by byte ranges, shared by the containers a decoder opens on it.

    The object is cut into regions: media data (mdat payloads) and metadata (everything else).
    A metadata region is fetched whole on first use and kept (``moov``: a few MiB at most, read
    by every container opened on the film). Media data is read in ``block_bytes`` blocks (an LRU
    of ``CACHE_BYTES``), never past its region, or for ``ReadPolicy.RANGES`` reads not in a
    cached block, exactly the bytes asked for.
    """

    def __init__(self, uri: str, block_bytes: int | None = None):
        import fsspec

        self.uri = uri
        self.block_bytes = int(block_bytes or os.environ.get("KISSRAY_RANGE_BLOCK_BYTES") or BLOCK_BYTES)
        self.read_ahead = int(os.environ.get("KISSRAY_RANGE_READ_AHEAD", READ_AHEAD_BLOCKS))  # blocks
        self.read_ahead_until: int | None = None  # no read-ahead of blocks from here (a window's end)
        self._fs, self._path = fsspec.core.url_to_fs(uri)
        info = self._fs.info(self._path)
        if info.get("size") is None:
            raise NotRangeReadable("the store does not say its size")
        self.size, self.version = int(info["size"]), object_version(info)
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._metadata: dict[int, bytes] = {}  # region start -> its bytes
        self._recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # exact ranges
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}  # read-ahead in flight
        self._sequential = (-1, 0)  # (end, size) of the last exact-range fetch
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        boxes = iso_boxes(self._head, self.size)
        self.regions = _regions([(payload, end) for kind, _, payload, end in boxes if kind == b"mdat"], self.size)

    def open(self, policy: ReadPolicy) -> "RangeFile":
        """A file object for PyAV that reads the media data as ``policy`` says."""
        return RangeFile(self, policy)

    def read(self, pos: int, n: int, policy: ReadPolicy) -> bytes:
        if pos >= self.size or n <= 0:
            return b""
        region = start, region_end, media = self.regions[bisect.bisect_right(self.regions, (pos, math.inf)) - 1]
        if not media and region_end - start <= MAX_METADATA_BYTES:
            return self._metadata_region(start, region_end)[pos - start:min(region_end, pos + n) - start]
        end = min(region_end, pos + n)
        if not media:  # a huge box that is not media data: read where read, never blanked
            return self._from_blocks(pos, end, region)
        if policy is ReadPolicy.BLANKED:
            return bytes(end - pos)
        if policy is ReadPolicy.RANGES and not self._cached(pos, end, start):
            return self._from_ranges(pos, end, region_end)
        return self._from_blocks(pos, end, region)

    def unchanged(self) -> bool:
        """Whether the object is still the one read (size and version), asked of the store."""
        self._fs.invalidate_cache(self._path)  # a cached listing may predate a change
        info = self._fs.info(self._path)
        return info.get("size") == self.size and object_version(info) == self.version

    def trim(self) -> None:
        """Drop the media blocks and ranges (a request is over; the next window of this film in
        this child reads other bytes): an idle decoder keeps only the film's metadata."""
        self.read_ahead_until = None
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            self._blocks.clear()
            self._recent.clear()
        for future in pending:
            future.cancel()

    def _head(self, start: int, end: int) -> bytes:
        """A box header: the first alone (is this an ISO file at all?), the others with the
        HEAD_BYTES after them (the next header, a small moov) in one GET."""
        if start == 0:
            return self._fetch(start, end)
        data = self._recent_range(start, end)
        if data is None:
            first = 0 if start < HEAD_BYTES else start  # the file's head in one piece (ftyp + moov of a faststart file)
            self._remember(first, self._fetch(first, min(self.size, start + max(end - start, HEAD_BYTES))))
            data = self._recent_range(start, end)
        return data

    def _metadata_region(self, start: int, end: int) -> bytes:
        data = self._metadata.get(start)
        if data is None:
            data = self._metadata[start] = self._recent_range(start, end) or self._fetch(start, end)
        return data

    def _from_blocks(self, pos: int, end: int, region: tuple[int, int, bool]) -> bytes:
        parts, (region_start, region_end, _) = [], region
        for block in range(pos // self.block_bytes, (end - 1) // self.block_bytes + 1):
            base, data = self._block(block, region_start, region_end)
            parts.append(data[max(pos, base) - base:end - base])
        self._read_ahead(block, region_start, region_end)
        return b"".join(parts)

    def _span(self, block: int, region_start: int, region_end: int) -> tuple[int, int]:
        """The bytes of ``block`` inside its region."""
        return max(block * self.block_bytes, region_start), min((block + 1) * self.block_bytes, region_end)

    def _block(self, block: int, region_start: int, region_end: int) -> tuple[int, bytes]:
        """(its first byte, its bytes): from the cache, a read-ahead in flight, or fetched now."""
        start, end = self._span(block, region_start, region_end)
        key = (block, start)
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
                return start, data
            pending = self._pending.pop(key, None)
        if pending is not None:
            data = pending.result()
        else:  # what a recent exact read already holds of it is not fetched again
            data = self._recent_prefix(start, end)
            if len(data) < end - start:
                data += self._fetch(start + len(data), end)
        with self._lock:
            self._blocks[key] = data
            while len(self._blocks) > max(2, CACHE_BYTES // self.block_bytes):
                self._blocks.popitem(last=False)
        return start, data

    def _read_ahead(self, block: int, region_start: int, region_end: int) -> None:
        """Fetch the next ``read_ahead`` blocks in the background: the decoder reads forward,
        and a ranged GET's latency is then spent while it decodes."""
        for ahead in range(block + 1, block + 1 + self.read_ahead):
            start, end = self._span(ahead, region_start, region_end)
            if start >= end or (self.read_ahead_until is not None and start >= self.read_ahead_until):
                return
            with self._lock:
                if (ahead, start) in self._blocks or (ahead, start) in self._pending:
                    continue
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(self.read_ahead, "kissray-read-ahead")
                self._pending[(ahead, start)] = self._executor.submit(self._fetch, start, end)

    def _from_ranges(self, pos: int, end: int, region_end: int) -> bytes:
        """[pos, end), from one of the last ``MAX_RECENT_RANGES`` fetched if it holds it (a demuxer
        seeks back into what it just read). Else fetched: exactly, or, when this read continues
        the last one, twice as much as that one (up to a block): a reader going forward needs
        fewer requests, one jumping from sample to sample (audio between video) reads no more."""
        data = self._recent_range(pos, end)
        if data is not None:
            return data
        last_end, last_n = self._sequential
        n = min(self.block_bytes, 2 * last_n) if pos == last_end else end - pos
        fetch_end = min(region_end, max(end, pos + n))
        self._sequential = (fetch_end, fetch_end - pos)
        self._remember(pos, self._fetch(pos, fetch_end))
        return self._recent_range(pos, end)

    def _remember(self, pos: int, data: bytes) -> None:
        with self._lock:
            self._recent[pos] = data
            while len(self._recent) > MAX_RECENT_RANGES:
                self._recent.popitem(last=False)

    def _recent_prefix(self, pos: int, end: int) -> bytes:
        """The longest start of [pos, end) held by one recent exact read (b"" when none)."""
        best = b""
        with self._lock:
            for start, data in self._recent.items():
                if start <= pos < start + len(data):
                    best = max(best, data[pos - start:end - start], key=len)
        return best

    def _recent_range(self, pos: int, end: int) -> bytes | None:
        with self._lock:
            for start, data in reversed(self._recent.items()):
                if start <= pos and end <= start + len(data):
                    return data[pos - start:end - start]
        return None

    def _cached(self, pos: int, end: int, region_start: int) -> bool:
        """Whether [pos, end) is in cached blocks (or blocks being read ahead: they are waited for)."""
        size = self.block_bytes
        with self._lock:
            return all((key := (block, max(block * size, region_start))) in self._blocks or key in self._pending
                       for block in range(pos // size, (end - 1) // size + 1))

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) from the store. Its failures are :class:`StorageError` (PyAV hands a
        read callback's exception back as it is, so the decoder can tell it from the film's own)."""
        try:
            data = self._fs.cat_file(self._path, start=start, end=end)
        except FileNotFoundError as e:  # gone since it was opened
            raise StorageError(self.uri, f"vanished while being read: {e}") from e
        except Exception as e:
            raise StorageError(self.uri, f"reading bytes {start}-{end} failed: {type(e).__name__}: {e}") from e
        if len(data) != min(end, self.size) - start:  # a store that ignores ranges, or an object that changed
            raise NotRangeReadable(f"asked for bytes {start}-{end}, got {len(data)} bytes")
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1
        return data


def _regions(media: list[tuple[int, int]], size: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_media) regions covering [0, size), sorted."""
    regions, pos = [], 0
    for start, end in sorted(media):
        if pos < start:
            regions.append((pos, start, False))
        if start < end:
            regions.append((start, min(end, size), True))
        pos = max(pos, end)
    if pos < size:
        regions.append((pos, size, False))
    return regions


class RangeFile(io.RawIOBase):
    """A seekable, read-only file over a :class:`RangeSource` (what ``av.open`` is given)."""

    def __init__(self, source: RangeSource, policy: ReadPolicy):
        super().__init__()
        self._source, self.policy, self._pos = source, policy, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        data = self._source.read(self._pos, len(buffer), self.policy)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)
