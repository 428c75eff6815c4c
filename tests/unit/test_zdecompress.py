"""Codec table (erofs/decompress.py) and COMPR_CFGS parsing (erofs/compr_cfgs.py) on hand-built bytes."""

from __future__ import annotations

import lzma
import random
import struct
import zlib

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_mount.errors import CorruptedError, ErofsMountError, UnsupportedError
from erofs_mount.erofs import decompress as D
from erofs_mount.erofs.compr_cfgs import parse_compr_cfgs

RNG = random.Random(7)
TEXT = b"".join(RNG.choice([b"alpha ", b"beta ", b"gamma\n", b"delta "]) for _ in range(6000))[:20000]


def pad(raw: bytes, size: int) -> bytes:
    """Right-align a compressed stream in a pcluster (LZ4_0PADDING / all other algorithms)."""
    return bytes(size - len(raw)) + raw


def microlzma(data: bytes, lc: int = 3, lp: int = 0, pb: int = 2) -> bytes:
    """A MicroLZMA stream: raw LZMA1 whose first (always zero) range-coder byte is ~props."""
    raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{
        "id": lzma.FILTER_LZMA1, "dict_size": 1 << 16, "lc": lc, "lp": lp, "pb": pb}])
    assert raw[0] == 0
    props = (pb * 5 + lp) * 9 + lc
    return bytes([~props & 0xFF]) + raw[1:]


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


# ---------------------------------------------------------------------------- LZ4

def test_lz4_zero_padded_full_decode():
    comp = lz4.block.compress(TEXT, store_size=False)
    src = pad(comp, 8192)
    assert D.decompress(D.Z_EROFS_COMPRESSION_LZ4, src, len(TEXT), strict=True) == TEXT


def test_lz4_wrong_length_is_corruption_in_strict_mode():
    src = pad(lz4.block.compress(TEXT, store_size=False), 8192)
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZ4, src, len(TEXT) + 1, strict=True)
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZ4, src, len(TEXT) - 1, strict=True)


def test_lz4_partial_decode_returns_a_prefix():
    src = pad(lz4.block.compress(TEXT, store_size=False), 8192)
    for n in (1, 100, 4096, len(TEXT) - 1):
        assert D.decompress(D.Z_EROFS_COMPRESSION_LZ4, src, n, strict=False) == TEXT[:n]


def test_lz4_partial_decode_of_a_block_much_larger_than_wanted_or_with_a_damaged_tail():
    big = TEXT * 40     # decodes to far more than 4 * n + 64 KiB for small n: the Python decoder
    comp = lz4.block.compress(big, store_size=False)
    for n in (10, 5000, 200_000, len(big) - 3):
        assert D.decompress(D.Z_EROFS_COMPRESSION_LZ4, comp, n, strict=False) == big[:n]
    cut = comp[:len(comp) * 3 // 4]     # the tail of the block is gone: only a prefix decodes
    assert D.decompress(D.Z_EROFS_COMPRESSION_LZ4, cut, 3000, strict=False) == big[:3000]
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZ4, cut, len(big), strict=False)


def test_lz4_without_zero_padding_ignores_trailing_zeros():
    comp = lz4.block.compress(TEXT, store_size=False)
    src = comp + bytes(8192 - len(comp))   # legacy layout: data first, zeroed tail
    assert D.decompress(D.Z_EROFS_COMPRESSION_LZ4, src, len(TEXT), strict=True, zero_padding=False) == TEXT


def test_lz4_all_padding_is_corruption():
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZ4, bytes(4096), 100, strict=True)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 4), st.data())
def test_lz4_python_partial_decoder_matches_c(payload, reps, data):
    blob = payload * (reps + 1) + bytes(data.draw(st.integers(0, 5000)))
    if not blob:
        return
    comp = lz4.block.compress(blob, store_size=False, mode=data.draw(st.sampled_from(["default", "high_compression"])))
    n = data.draw(st.integers(1, len(blob)))
    assert D.lz4_decode_partial(comp, n) == blob[:n]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.integers(1, 70000))
def test_lz4_garbage_never_escapes_or_overgrows(garbage, out_len):
    for strict in (True, False):
        try:
            out = D.decompress(D.Z_EROFS_COMPRESSION_LZ4, garbage, out_len, strict=strict)
        except CorruptedError:
            continue
        assert len(out) == out_len


# ---------------------------------------------------------------------------- MicroLZMA / DEFLATE / ZSTD

@pytest.mark.parametrize("lc,lp,pb", [(3, 0, 2), (0, 0, 0), (1, 3, 4), (4, 0, 0)])
def test_microlzma(lc, lp, pb):
    src = pad(microlzma(TEXT, lc, lp, pb), 16384)
    assert D.decompress(D.Z_EROFS_COMPRESSION_LZMA, src, len(TEXT), strict=True, lzma_dict_size=1 << 16) == TEXT
    assert D.decompress(D.Z_EROFS_COMPRESSION_LZMA, src, 777, strict=False) == TEXT[:777]


def test_microlzma_bad_properties_byte():
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZMA, b"\x00\x00\x05" + TEXT[:50], 100, strict=True)   # ~0x05 = 0xfa
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZMA, bytes([0xFF]) + bytes(20), 100, strict=True)


def test_deflate_strict_and_partial():
    src = pad(raw_deflate(TEXT), 8192)
    assert D.decompress(D.Z_EROFS_COMPRESSION_DEFLATE, src, len(TEXT), strict=True) == TEXT
    assert D.decompress(D.Z_EROFS_COMPRESSION_DEFLATE, src, 5000, strict=False) == TEXT[:5000]
    with pytest.raises(CorruptedError):   # the pcluster holds more than the extent
        D.decompress(D.Z_EROFS_COMPRESSION_DEFLATE, src, 5000, strict=True)
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_DEFLATE, src, len(TEXT) + 1, strict=False)


@pytest.mark.parametrize("lib", ["libdeflate", "zlib"])
def test_deflate_both_decoders_agree(lib):
    """libdeflate takes whole streams, zlib the rest (and could do all of it): the same bytes and
    the same refusals either way."""
    if lib == "zlib":
        def decode(src, n, strict):
            return D._deflate_zlib(D.strip_zero_padding(src), n, strict)
    else:
        def decode(src, n, strict):
            return D.decompress(D.Z_EROFS_COMPRESSION_DEFLATE, src, n, strict=strict)
    full = pad(raw_deflate(TEXT), 8192)
    assert bytes(decode(full, len(TEXT), True)) == TEXT
    assert bytes(decode(full, 77, False)) == TEXT[:77]
    for src, n, strict in ((full, 77, True),                    # more in the pcluster than the extent
                           (full[:len(full) // 3], len(TEXT), False),   # cut short
                           (bytes(reversed(full)), len(TEXT), True),     # garbage
                           (full, len(TEXT) + 4096, False)):            # the extent wants more
        with pytest.raises(CorruptedError):
            decode(src, n, strict)


def test_zstd_strict_and_partial():
    src = pad(zstandard.ZstdCompressor(level=9).compress(TEXT), 8192)
    assert D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, src, len(TEXT), strict=True) == TEXT
    assert D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, src, 123, strict=False) == TEXT[:123]
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, src, 123, strict=True)
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, src[:-10], len(TEXT), strict=True)


def test_zstd_frame_asking_for_a_huge_window_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=26, write_content_size=0)
    big = zstandard.ZstdCompressor(compression_params=params).compress(TEXT * 300)
    assert zstandard.get_frame_parameters(big).window_size > 1 << 21
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, big, 4096, strict=False)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.binary(min_size=1, max_size=400), st.integers(1, 50000))
def test_stream_codecs_on_garbage_raise_only_corruption(alg, garbage, out_len):
    try:
        out = D.decompress(alg, garbage, out_len, strict=False)
    except CorruptedError:
        return
    assert len(out) == out_len


# ---------------------------------------------------------------------------- uncompressed pclusters

def test_shifted():
    assert D.decompress(D.Z_EROFS_COMPRESSION_SHIFTED, b"abcdefgh", 5, strict=True) == b"abcde"
    with pytest.raises(CorruptedError):
        D.decompress(D.Z_EROFS_COMPRESSION_SHIFTED, b"abc", 5, strict=True)


def test_interlaced_rotates_by_the_in_block_offset():
    bs = 16
    data = bytes(range(100, 116))
    la = 5      # logical start inside its block: the first bs-5 bytes sit at offset 5 of the pcluster
    stored = data[11:] + data[:11]
    assert stored[5:] == data[:11]
    out = D.decompress(D.Z_EROFS_COMPRESSION_INTERLACED, stored, 16, strict=True, la=la, block_size=bs)
    assert out == data
    assert D.decompress(D.Z_EROFS_COMPRESSION_INTERLACED, stored, 4, strict=True, la=la, block_size=bs) == data[:4]


def test_unknown_algorithm_and_oversized_extent():
    with pytest.raises(UnsupportedError):
        D.decompress(9, b"x", 1, strict=True)
    with pytest.raises(UnsupportedError):
        D.decompress(D.Z_EROFS_COMPRESSION_LZ4, b"x", D.Z_EROFS_PCLUSTER_MAX_DSIZE + 1, strict=True)


# ---------------------------------------------------------------------------- COMPR_CFGS

def _cfg_reader(records: list[bytes], sb_size: int = 128):
    buf = bytearray(1024 + sb_size)
    for rec in records:
        while len(buf) % 4:
            buf.append(0)
        buf += struct.pack("<H", len(rec)) + rec
    data = bytes(buf)
    return lambda pos, n: data[pos:pos + n]


def test_cfgs_absent_means_lz4_with_max_distance():
    c = parse_compr_cfgs(0x1, 65535, 128, 12, lambda p, n: b"")
    assert c.available_compr_algs == 1 and c.lz4_max_distance == 65535 and c.zero_padding
    assert c.names() == ["lz4"]


def test_cfgs_all_four_algorithms():
    recs = [struct.pack("<HH10x", 65535, 16), struct.pack("<IH8x", 1 << 20, 0), struct.pack("<B5x", 15),
            struct.pack("<BB4x", 0, 7)]
    c = parse_compr_cfgs(0x3, 0b1111, 128, 12, _cfg_reader(recs))
    assert c.names() == ["lz4", "lzma", "deflate", "zstd"]
    assert (c.lz4_max_pclusterblks, c.lzma_dict_size, c.deflate_windowbits, c.zstd_windowlog) == (16, 1 << 20, 15, 17)


def test_cfgs_unknown_algorithm_is_refused_by_id():
    with pytest.raises(UnsupportedError, match="id.* 4"):
        parse_compr_cfgs(0x3, 0b10001, 128, 12, _cfg_reader([struct.pack("<HH10x", 0, 1)]))


@pytest.mark.parametrize("alg,rec", [
    (0b10, struct.pack("<IH8x", 1 << 20, 1)),           # lzma format 1
    (0b10, struct.pack("<IH8x", 100, 0)),               # lzma dict too small
    (0b100, struct.pack("<B5x", 16)),                   # deflate windowbits
    (0b1000, struct.pack("<BB4x", 0, 11)),              # zstd window 2^21 > 1 MiB
    (0b1, b"\x00" * 4),                                 # lz4 record too short
])
def test_cfgs_invalid_records(alg, rec):
    with pytest.raises(ErofsMountError):
        parse_compr_cfgs(0x3, alg, 128, 12, _cfg_reader([rec]))


def test_cfgs_past_the_end_of_the_image():
    with pytest.raises(CorruptedError):
        parse_compr_cfgs(0x3, 0b1, 128, 12, lambda p, n: b"")


def test_zstd_decodes_from_many_threads_at_once():
    # the FUSE daemon decodes pclusters in worker threads; python-zstandard decompressors are not
    # thread-safe, so each thread must use its own (a shared one returned wrong bytes, silently)
    import threading

    rng = random.Random(7)
    cctx = zstandard.ZstdCompressor(level=3)
    cases = []
    for i in range(24):
        n = rng.randrange(20_000, 130_000)
        data = bytes(rng.getrandbits(3) for _ in range(n))   # compressible, different per case
        cases.append((cctx.compress(data), data))
    wrong: list = []

    def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(150):
            raw, data = cases[r.randrange(len(cases))]
            try:
                out = D.decompress(D.Z_EROFS_COMPRESSION_ZSTD, raw, len(data), strict=True)
            except ErofsMountError as exc:
                wrong.append(exc)
                continue
            if out != data:
                wrong.append(len(data))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
