"""Gaussian noise for differential privacy from a CSPRNG: the AES-256-CTR keystream (OpenSSL
through `cryptography`, AES-NI where the CPU has it) read as uniform integers and turned into
normals by the ziggurat method in a compiled kernel. Used by DP-SGD, by DP-FedAvg's server
and by each client's noise share under secure aggregation.

Every stream is (key, stream id): the counter block is the 64-bit stream id followed by a 64-bit
block counter from 0, so streams never overlap. Keys come from `derive_key`: HKDF-SHA256 of the
run's 256-bit noise seed, bound to a purpose and its ids (a client and a round), so that no
stream can be computed from another (a keyed derivation).

The normals come from Marsaglia and Tsang's ziggurat (2000), with Doornik's (2005) fix: the
layer and the value take separate bits of each 64-bit word. Its largest draw is about 14 (the
tail method's uniforms have 53 bits): a cap whose mass, ~1e-44, is far below any delta used.
"""
from __future__ import annotations

import math
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_kernel = None
_kernel32 = None


def derive_key(seed: int | bytes, purpose: str, *ids: int) -> bytes:
    """A 256-bit AES key for one purpose ("dpsgd", "central", "share", ...) and its ids."""
    material = seed if isinstance(seed, bytes) else int(seed).to_bytes(KEY_BYTES, "little") \
        if 0 <= int(seed) < 2**256 else None
    if material is None:
        raise ValueError(f"a noise seed is an integer in [0, 2^256), got {seed!r}")
    info = b"hpcfl-noise/" + purpose.encode() + b"".join(struct.pack("<q", int(i)) for i in ids)
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(material)


def _tables(value_bits: int = 32):
    """Marsaglia & Tsang's (2000) ziggurat for N(0, 1) with 128 layers: kn (acceptance bounds
    on |hz|, a signed integer of value_bits bits), wn (its scale to x) and fn (the density at
    each layer)."""
    kn, wn, fn = np.zeros(128, np.int64), np.zeros(128), np.zeros(128)
    m1, dn, vn = float(2 ** (value_bits - 1)), 3.442619855899, 9.91256303526217e-3
    tn, q = dn, vn / math.exp(-0.5 * dn * dn)
    kn[0], kn[1] = int(dn / q * m1), 0
    wn[0], wn[127] = q / m1, dn / m1
    fn[0], fn[127] = 1.0, math.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = math.sqrt(-2.0 * math.log(vn / dn + math.exp(-0.5 * dn * dn)))
        kn[i + 1] = int(dn / tn * m1)
        tn = dn
        fn[i] = math.exp(-0.5 * dn * dn)
        wn[i] = dn / m1
    return kn, wn, fn


def _ziggurat():
    global _kernel
    if _kernel is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def ziggurat(words, kn, wn, fn, out, start):
            """Fills out[start:] from the 64-bit words; returns (filled up to, words used). The
            layer comes from the low 7 bits and the value from the high 32 (Doornik 2005: the
            original's shared bits bias it); a slow path takes further words as uniforms."""
            n, used, nw, i = out.shape[0], 0, words.shape[0], start
            r = 3.442619855899
            while i < n:
                if used >= nw - 4:                  # at most 4 words more per sample below
                    break
                w = words[used]
                used += 1
                iz = np.int64(w & np.uint64(127))
                hz = np.int64(np.int32(np.uint32(w >> np.uint64(32))))
                if abs(hz) < kn[iz]:
                    out[i] = hz * wn[iz]
                    i += 1
                    continue
                while True:                          # the rare slow path (about 1.2%)
                    x = hz * wn[iz]
                    if iz == 0:                      # the tail beyond r (Marsaglia 1964)
                        while True:
                            if used >= nw - 2:
                                return i, nw         # out of words: the caller draws more
                            u1 = (np.float64(words[used] >> np.uint64(11)) + 1.0) * 1.1102230246251565e-16
                            u2 = (np.float64(words[used + 1] >> np.uint64(11)) + 1.0) * 1.1102230246251565e-16
                            used += 2
                            xt = -math.log(u1) / r
                            if -2.0 * math.log(u2) >= xt * xt:
                                break
                        x = r + xt if hz > 0 else -r - xt
                        break
                    if used >= nw - 2:
                        return i, nw
                    u = np.float64(words[used] >> np.uint64(11)) * 1.1102230246251565e-16
                    used += 1
                    if fn[iz] + u * (fn[iz - 1] - fn[iz]) < math.exp(-0.5 * x * x):
                        break
                    w = words[used]
                    used += 1
                    iz = np.int64(w & np.uint64(127))
                    hz = np.int64(np.int32(np.uint32(w >> np.uint64(32))))
                    if abs(hz) < kn[iz]:
                        x = hz * wn[iz]
                        break
                out[i] = x
                i += 1
            return i, used

        _kernel = ziggurat
    return _kernel


def _ziggurat32():
    """The same ziggurat from one 32-bit word per draw, for float32 output: the layer from the
    low 7 bits, the value from the high 25 (more than a float32's 24-bit mantissa); the slow
    path's uniforms take two words (53 bits), so the tail reaches as far as the 64-bit kernel's."""
    global _kernel32
    if _kernel32 is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def ziggurat32(words, kn, wn, fn, out, start):
            n, used, nw, i = out.shape[0], 0, words.shape[0], start
            r = 3.442619855899
            scale = 1.1102230246251565e-16                   # 2^-53
            while i < n:
                if used >= nw - 8:
                    break
                w = words[used]
                used += 1
                iz = np.int64(w & np.uint32(127))
                hz = np.int64(np.int32(w) >> 7)
                if abs(hz) < kn[iz]:
                    out[i] = hz * wn[iz]
                    i += 1
                    continue
                while True:
                    x = hz * wn[iz]
                    if iz == 0:
                        while True:
                            if used >= nw - 4:
                                return i, nw
                            a = (np.uint64(words[used]) >> np.uint64(5)) * np.uint64(67108864)
                            u1 = (np.float64(a + (np.uint64(words[used + 1]) >> np.uint64(6))) + 1.0) * scale
                            b = (np.uint64(words[used + 2]) >> np.uint64(5)) * np.uint64(67108864)
                            u2 = (np.float64(b + (np.uint64(words[used + 3]) >> np.uint64(6))) + 1.0) * scale
                            used += 4
                            xt = -math.log(u1) / r
                            if -2.0 * math.log(u2) >= xt * xt:
                                break
                        x = r + xt if hz > 0 else -r - xt
                        break
                    if used >= nw - 3:
                        return i, nw
                    a = (np.uint64(words[used]) >> np.uint64(5)) * np.uint64(67108864)
                    u = np.float64(a + (np.uint64(words[used + 1]) >> np.uint64(6))) * scale
                    used += 2
                    if fn[iz] + u * (fn[iz - 1] - fn[iz]) < math.exp(-0.5 * x * x):
                        break
                    w = words[used]
                    used += 1
                    iz = np.int64(w & np.uint32(127))
                    hz = np.int64(np.int32(w) >> 7)
                    if abs(hz) < kn[iz]:
                        x = hz * wn[iz]
                        break
                out[i] = x
                i += 1
            return i, used

        _kernel32 = ziggurat32
    return _kernel32


class Gaussian:
    """Draws standard normals from (key, stream) into caller buffers; reuses its keystream
    buffer across calls. float64 buffers take a 64-bit word per draw, float32 ones a 32-bit
    word (half the keystream: DP-SGD's noise)."""

    def __init__(self):
        self._buf = np.empty(0, np.uint8)
        self._zeros = b""
        self._kn, self._wn, self._fn = _tables()
        self._kn32, self._wn32, _ = _tables(25)

    def _words(self, key: bytes, stream: int, block: int, count: int, dtype=np.uint64) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * count
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._buf = np.empty(nbytes + 16, np.uint8)
        iv = struct.pack(">QQ", stream, block)
        Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update_into(
            memoryview(self._zeros)[:nbytes], self._buf)  # type: ignore[arg-type]  # a writable buffer
        return self._buf[:nbytes].view(dtype)

    def standard_normal(self, key: bytes, stream: int, out: np.ndarray) -> np.ndarray:
        """Fills out (float32 or float64, 1-D) with N(0, 1) draws of stream `stream` under key."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"noise keys are {KEY_BYTES} bytes, got {len(key)}")
        if not 0 <= stream < 2**64:
            raise ValueError(f"stream ids are 64-bit, got {stream}")
        n, filled, block = out.shape[0], 0, 0
        narrow = out.dtype == np.float32
        per_block = 4 if narrow else 2                # words per 16-byte AES block
        while filled < n:
            count = per_block * (((n - filled) + (n - filled) // 16 + 64) // per_block + 1)
            if narrow:
                words = self._words(key, stream, block, count, np.uint32)
                filled, used = _ziggurat32()(words, self._kn32, self._wn32, self._fn, out, filled)
            else:
                words = self._words(key, stream, block, count)
                filled, used = _ziggurat()(words, self._kn, self._wn, self._fn, out, filled)
            block += -(-used // per_block)            # a new chunk starts on the next AES block
        return out


_shared = Gaussian()


def uniform_words(key: bytes, stream: int, count: int) -> np.ndarray:
    """`count` uniform 64-bit words of (key, stream): the keystream itself (a new array)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"noise keys are {KEY_BYTES} bytes, got {len(key)}")
    return _shared._words(key, stream, 0, count).copy()


def bernoulli(key: bytes, stream: int, n: int, p: float) -> np.ndarray:
    """n independent Bernoulli(p) draws of (key, stream) from the CSPRNG, as a bool array: word
    i < floor(p 2^64), so each is 1 with probability within 2^-64 below p (never above)."""
    if not 0 <= p <= 1:
        raise ValueError(f"a probability must be in [0, 1], got {p!r}")
    if p >= 1:
        return np.ones(n, bool)
    return uniform_words(key, stream, n) < np.uint64(int(p * 2**64))


def standard_normal(key: bytes, stream: int, n: int, dtype=np.float64) -> np.ndarray:
    """n standard normals of (key, stream), a new array."""
    return _shared.standard_normal(key, stream, np.empty(n, dtype))
