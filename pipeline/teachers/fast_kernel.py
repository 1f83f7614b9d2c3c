"""Decode-step attention for bfloat16 caches, in C: the one kernel torch lacks for small-batch decoding.

    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py -k kernel

In a decode step every row has one new query per head and its own keys, so attention is hundreds of
tiny (group x head_dim) by (head_dim x length) products. `scaled_dot_product_attention` on CPU runs
them as separate blocked GEMMs and spends most of its time on per-block set-up: about half of a
decode step of SmolLM2-135M at 64-128 rows here. This kernel does the same arithmetic row by row with
vector registers (query heads of one key-value head share each key and value load), in float32,
and writes bfloat16 rounded to nearest even: keys as (slot, kv-head, dim, position) so the scores of
16 positions come from one vector, values as (slot, kv-head, position, dim). Head sizes 64, 128
(Llama family) and 256 (Gemma 3); a sliding-window layer attends to its last `window` positions only.

The C source below is compiled once per machine with the system C compiler (`$CC`, else `cc`) into
`$SIFT_CACHE/kernels/` (`-march=native`, so the file name carries the compiler and CPU), and loaded
with ctypes, which releases the GIL during the call. Without a compiler, or if the build fails,
`load()` returns None and the decoder uses `scaled_dot_product_attention` (a build failure is said
once on stderr). The sha256 of each library sift builds is recorded beside it (`.so.sha256`); a
library that does not match its record (replaced, truncated, or not built by sift) is never loaded:
it is rebuilt, and that is said once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

typedef float vf __attribute__((vector_size(64)));          /* 16 float32 */
typedef uint16_t vh __attribute__((vector_size(32)));       /* 16 bfloat16 bit patterns */
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

enum { W = 16, MAXG = 8, MAXD = 256 };

/* 1 where the build targets wide vectors (AVX2 or AVX-512): elsewhere the caller keeps torch's attention */
int sift_kernel_vectorised(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

static inline vf load_bf16(const uint16_t *p) {
    vh h; memcpy(&h, p, sizeof h);
    vu w = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &w, sizeof f);
    return f;
}

static inline void store_bf16(uint16_t *p, vf f) {       /* round to nearest even; NaN stays NaN */
    vu u; memcpy(&u, &f, sizeof u);
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vi nan = f != f;
    r = (vu)((vi)r & ~nan) | ((vu)nan & 0x7fc0u);
    vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
}

/* One (row, kv-head): G queries (float, pre-scaled, MAXD apart) against positions from..len-1, the
   scores of the 16-aligned block holding `from` computed but not used; D = DC*16. */
static inline __attribute__((always_inline)) void head(
        const int G, const int DC, const float *qf, const uint16_t *kt, const uint16_t *v, int64_t from,
        int64_t len, int64_t cap, float *s, uint16_t *out) {
    const int D = DC * W;
    for (int64_t j = from & ~(int64_t)(W - 1); j < len; j += W) {   /* scores of 16 positions per vector */
        vf acc[MAXG];
        for (int i = 0; i < G; i++) acc[i] = (vf){0};
        for (int t = 0; t < D; t++) {
            vf k = load_bf16(kt + t * cap + j);
            for (int i = 0; i < G; i++) acc[i] += qf[i * MAXD + t] * k;
        }
        for (int i = 0; i < G; i++) memcpy(s + i * cap + j, &acc[i], sizeof acc[i]);
    }
    for (int i = 0; i < G; i++) {                            /* softmax over from..len-1 */
        float *si = s + i * cap, m = si[from], sum = 0.f;
        for (int64_t j = from + 1; j < len; j++) m = si[j] > m ? si[j] : m;
        for (int64_t j = from; j < len; j++) { si[j] = expf(si[j] - m); sum += si[j]; }
        float inv = 1.f / sum;
        for (int64_t j = from; j < len; j++) si[j] *= inv;
    }
    /* weighted values, BC vectors of each query's output at a time: all of them where the accumulators
       fit the registers (G x DC <= 32: SmolLM2, head_dim 128 with G <= 4), else blocks of 4 (Gemma 3's
       head_dim 256: 4 x 16 accumulators would spill) */
    const int BC = DC * G <= 32 ? DC : 4;
    for (int c0 = 0; c0 < DC; c0 += BC) {
        vf acc[MAXG][MAXD / W];
        for (int i = 0; i < G; i++)
            for (int c = 0; c < BC; c++) acc[i][c] = (vf){0};
        for (int64_t j = from; j < len; j++) {
            vf x[MAXD / W];
            for (int c = 0; c < BC; c++) x[c] = load_bf16(v + j * D + (c0 + c) * W);
            for (int i = 0; i < G; i++) {
                float p = s[i * cap + j];
                for (int c = 0; c < BC; c++) acc[i][c] += p * x[c];
            }
        }
        for (int i = 0; i < G; i++)
            for (int c = 0; c < BC; c++) store_bf16(out + i * D + (c0 + c) * W, acc[i][c]);
    }
}

#define HEAD(G, DC) head(G, DC, qf, kslot, vslot, from, len, cap, scratch, o)
#define GROUPS(DC) switch (group) { \
    case 1: HEAD(1, DC); break; case 2: HEAD(2, DC); break; case 3: HEAD(3, DC); break; \
    case 4: HEAD(4, DC); break; case 5: HEAD(5, DC); break; case 6: HEAD(6, DC); break; \
    case 7: HEAD(7, DC); break; default: HEAD(8, DC); break; }

/* Row r (of n) stores its new key and value at position lengths[r]-1 of cache slot r, then attends
   to positions 0..lengths[r]-1, or to the last `window` of them when window > 0 (a sliding-window
   layer). Row r's query head h*group+i is at q + r*stride + (h*group+i)*d, its new key for kv-head h
   at knew + r*stride + h*d, its new value at vnew + r*stride + h*d (bfloat16, one row stride for all
   three: they are slices of one projection). kt: (slots, kvh, d, cap); v: (slots, kvh, cap, d); out:
   (n, kvh*group*d); scratch: group*cap floats; d is 64, 128 or 256 and cap a multiple of 16. Constant
   group and d keep the accumulators in registers. */
int sift_decode_attention(const uint16_t *q, const uint16_t *knew, const uint16_t *vnew, int64_t stride,
                          uint16_t *kt, uint16_t *v, const int64_t *lengths, uint16_t *out, int64_t n,
                          int64_t kvh, int64_t group, int64_t d, int64_t cap, float scale, int64_t window,
                          float *scratch) {
    if (group < 1 || group > MAXG || (d != 64 && d != 128 && d != 256) || cap % W || window < 0) return 1;
    for (int64_t r = 0; r < n; r++)
        if (lengths[r] < 1 || lengths[r] > cap) return 2;
    float qf[MAXG * MAXD];
    for (int64_t r = 0; r < n; r++) {
        int64_t len = lengths[r], from = window > 0 && len > window ? len - window : 0;
        for (int64_t h = 0; h < kvh; h++) {
            uint16_t *kslot = kt + (r * kvh + h) * d * cap, *vslot = v + (r * kvh + h) * cap * d;
            const uint16_t *kn = knew + r * stride + h * d, *vn = vnew + r * stride + h * d;
            for (int64_t t = 0; t < d; t++) kslot[t * cap + len - 1] = kn[t];
            memcpy(vslot + (len - 1) * d, vn, d * sizeof *vn);
            for (int64_t i = 0; i < group; i++) {
                const uint16_t *qr = q + r * stride + (h * group + i) * d;
                for (int64_t t = 0; t < d; t++) {
                    uint32_t w = (uint32_t)qr[t] << 16; float f; memcpy(&f, &w, sizeof f);
                    qf[i * MAXD + t] = f * scale;
                }
            }
            uint16_t *o = out + (r * kvh + h) * group * d;
            if (d == 64) GROUPS(4) else if (d == 128) GROUPS(8) else GROUPS(16)
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- sampling candidates */

typedef struct { float v; int64_t id; } cand;

static inline int worse(cand a, cand b) { return a.v < b.v || (a.v == b.v && a.id > b.id); }

static void sift_down(cand *h, int64_t k, int64_t i) {   /* min-heap: the worst candidate on top */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < k && worse(h[l], h[w])) w = l;
        if (r < k && worse(h[r], h[w])) w = r;
        if (w == i) return;
        cand t = h[i]; h[i] = h[w]; h[w] = t; i = w;
    }
}

static int better_first(const void *a, const void *b) {   /* larger value first; lower id first on ties */
    const cand *x = a, *y = b;
    if (x->v != y->v) return x->v < y->v ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

enum { CHUNK = 2048 };

static void chunk(const void *row, int bf16, int64_t j, int64_t len, float *buf) {   /* logits j.. as float */
    if (!bf16) { memcpy(buf, (const float *)row + j, len * sizeof *buf); return; }
    const uint16_t *p = (const uint16_t *)row + j;
    for (int64_t i = 0; i < len; i++) { uint32_t w = (uint32_t)p[i] << 16; memcpy(buf + i, &w, sizeof w); }
}

/* For each of n rows of logits (bfloat16 if bf16 else float32; row r at logits + r*ld elements), with
   inv_t[r] = 1/temperature > 0: lse[r] = log sum_j exp(l_j * inv_t[r]), and the k best tokens (largest
   logit first, lower id first among equal logits: the order of a stable descending sort) as ids and
   scaled logits l * inv_t[r]. heap: k candidates of scratch. Returns 0, or 1 for bad sizes. */
int sift_top_candidates(const void *logits, int bf16, int64_t n, int64_t vocab, int64_t ld, const float *inv_t,
                        int64_t k, int64_t *ids, float *vals, double *lse, cand *heap) {
    if (k < 1 || k > vocab) return 1;
    float buf[CHUNK];
    for (int64_t r = 0; r < n; r++) {
        const void *row = bf16 ? (const void *)((const uint16_t *)logits + r * ld)
                               : (const void *)((const float *)logits + r * ld);
        float t = inv_t[r], m;
        chunk(row, bf16, 0, 1, &m);
        for (int64_t j = 0; j < vocab; j += CHUNK) {          /* the largest logit */
            int64_t len = vocab - j < CHUNK ? vocab - j : CHUNK;
            chunk(row, bf16, j, len, buf);
            for (int64_t i = 0; i < len; i++) m = buf[i] > m ? buf[i] : m;
        }
        double z = 0;
        int64_t within[4] = {0, 0, 0, 0};                     /* tokens within 4, 8, 16, 32 of the largest */
        for (int64_t j = 0; j < vocab; j += CHUNK) {          /* the normaliser, relative to the largest */
            int64_t len = vocab - j < CHUNK ? vocab - j : CHUNK;
            float part = 0.f;
            int32_t c4 = 0, c8 = 0, c16 = 0, c32 = 0;
            chunk(row, bf16, j, len, buf);
            for (int64_t i = 0; i < len; i++) {
                float x = (buf[i] - m) * t;
                part += expf(x);
                c4 += x >= -4.f; c8 += x >= -8.f; c16 += x >= -16.f; c32 += x >= -32.f;
            }
            z += part;
            within[0] += c4; within[1] += c8; within[2] += c16; within[3] += c32;
        }
        lse[r] = (double)m * t + log(z);
        /* the k best lie among the tokens at least as large as the tightest level holding k of them */
        float floor_ = -INFINITY;
        for (int l = 3; l >= 0; l--)
            if (within[l] >= k) floor_ = m - (float)(4 << l) / t;
        int64_t filled = 0;
        for (int pass = 0; pass < 2 && filled < k; pass++, filled = 0, floor_ = -INFINITY) {
            for (int64_t j = 0; j < vocab; j += CHUNK) {      /* through a heap with the worst on top */
                int64_t len = vocab - j < CHUNK ? vocab - j : CHUNK;
                chunk(row, bf16, j, len, buf);
                for (int64_t b = 0; b < len; b += W) {
                    int64_t end = b + W < len ? b + W : len;
                    if (end - b == W) {                        /* skip 16 at once when none can enter */
                        vf x; memcpy(&x, buf + b, sizeof x);
                        vi in = (x >= floor_) & (filled < k ? x == x : x > heap[0].v);
                        uint64_t any[W / 2]; memcpy(any, &in, sizeof any);
                        if (!(any[0] | any[1] | any[2] | any[3] | any[4] | any[5] | any[6] | any[7])) continue;
                    }
                    for (int64_t i = b; i < end; i++) {
                        if (buf[i] < floor_) continue;
                        if (filled < k) {
                            heap[filled++] = (cand){buf[i], j + i};
                            if (filled == k)
                                for (int64_t h = k / 2; h >= 0; h--) sift_down(heap, k, h);
                        } else if (buf[i] > heap[0].v) {       /* equal values: the earlier id stays */
                            heap[0] = (cand){buf[i], j + i};
                            sift_down(heap, k, 0);
                        }
                    }
                }
            }
            if (filled == k) break;                            /* else rounding at the floor: scan everything */
        }
        qsort(heap, k, sizeof *heap, better_first);
        for (int64_t j = 0; j < k; j++) { ids[r * k + j] = heap[j].id; vals[r * k + j] = heap[j].v * t; }
    }
    return 0;
}
"""

MAX_GROUP, HEAD_DIMS = 8, (64, 128, 256)  # what the C source handles
# -ffast-math only when compiling (vectorised expf and sums); linking without it keeps gcc from adding
# crtfastmath.o, which would switch the whole process to flush-denormals-to-zero
COMPILE = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-c"]
LINK = ["-shared"]
LIBS = ["-lmvec", "-lm"]

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, target: Path) -> None:
    """Compile SOURCE into `target` atomically (a temporary folder, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, obj, lib = Path(tmp) / "k.c", Path(tmp) / "k.o", Path(tmp) / "k.so"
        src.write_text(SOURCE)
        for cmd in ([cc, *COMPILE, str(src), "-o", str(obj)], [cc, *LINK, str(obj), "-o", str(lib), *LIBS]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        record = Path(tmp) / "k.sha256"
        record.write_text(_sha256(lib) + "\n")
        os.replace(record, _record(target))  # the record first: a library without its match is rebuilt
        os.replace(lib, target)


def _record(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Whether `target` is the very file sift built there (its sha256 matches the record)."""
    try:
        return _record(target).read_text().strip() == _sha256(target)
    except OSError:
        return False


def _failure(e: BaseException) -> str:
    stderr = getattr(e, "stderr", None)
    detail = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr or "")).strip()
    return (detail.splitlines()[0] if detail else str(e))[:200]


class Kernels:
    """The compiled functions, with their C signatures."""

    def __init__(self, lib: Any) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int64
        self.attention = lib.sift_decode_attention
        self.attention.restype = ctypes.c_int
        self.attention.argtypes = [p, p, p, i, p, p, p, p, i, i, i, i, i, ctypes.c_float, i, p]
        self.candidates = lib.sift_top_candidates
        self.candidates.restype = ctypes.c_int
        self.candidates.argtypes = [p, ctypes.c_int, i, i, i, p, i, p, p, p, p]


def load() -> Kernels | None:
    """The compiled kernels, built on first use; None where they cannot be built or would not be vectorised."""
    from pipeline.io.models import cache_dir
    from pipeline.io.progress import note

    with _lock:
        if "kernels" in _loaded:
            return _loaded["kernels"]
        kernels = None
        cc = _compiler()
        if cc is not None and platform.system() == "Linux":
            try:
                version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
                key = hashlib.sha256("\0".join([SOURCE, *COMPILE, *LINK, *LIBS, version, _cpu_flags()])
                                     .encode()).hexdigest()[:16]
                target = cache_dir() / "kernels" / f"sift_kernels-{platform.machine()}-{key}.so"
                if target.is_file() and not _verified(target):
                    why = ("does not match the sha256 sift recorded when it built it" if _record(target).is_file()
                           else "has no record of sift building it")
                    note(f"{target} {why}; not loading it, rebuilding")
                if not _verified(target):
                    _build(cc, target)
                lib = ctypes.CDLL(str(target))
                if lib.sift_kernel_vectorised():
                    kernels = Kernels(lib)
            except (OSError, subprocess.SubprocessError) as e:
                note(f"could not build the decode kernels with {cc} ({_failure(e)}); "
                     "using torch's attention, which is slower")
                kernels = None
        _loaded["kernels"] = kernels
        return kernels


def usable(group: int, head_dim: int) -> bool:
    """Whether the kernel handles this head geometry."""
    return 1 <= group <= MAX_GROUP and head_dim in HEAD_DIMS


def decode_attention(kernels: Kernels, qkv: Any, kt: Any, v: Any, lengths: Any, *, heads: int, kv_heads: int,
                     scale: float, window: int | None = None) -> Any:
    """Store each row's new key and value, then attend. qkv: (n, (heads + 2*kv_heads) * d) bfloat16,
    queries | keys (both already rotated) | values, rows contiguous; kt: (slots, kv_heads, d, cap) and
    v: (slots, kv_heads, cap, d), contiguous bfloat16, written at position lengths[r]-1 of slot r;
    lengths: int64 (n,); window: attend to the last `window` positions only (a sliding-window layer),
    None for all of them. Returns (n, heads*d)."""
    import torch

    n, cap, d = qkv.shape[0], v.shape[2], v.shape[3]
    if qkv.stride(-1) != 1 or not (kt.is_contiguous() and v.is_contiguous() and lengths.is_contiguous()):
        raise ValueError("decode_attention needs contiguous caches and projection rows")
    if qkv.dtype != torch.bfloat16 or kt.dtype != torch.bfloat16 or v.dtype != torch.bfloat16:
        raise ValueError("decode_attention works on bfloat16")
    out = torch.empty(n, heads * d, dtype=qkv.dtype)
    scratch = torch.empty(heads // kv_heads * cap, dtype=torch.float32)
    base, step = qkv.data_ptr(), qkv.element_size()
    status = kernels.attention(base, base + heads * d * step, base + (heads + kv_heads) * d * step, qkv.stride(0),
                kt.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(), n, kv_heads, heads // kv_heads,
                d, cap, scale, window or 0, scratch.data_ptr())
    if status:
        raise ValueError(f"decode_attention rejected its arguments (status {status})")
    return out


CAND_BYTES = 16  # sizeof(cand) in the C source: a float and an int64


def top_candidates(kernels: Kernels, logits: Any, inv_temperature: Any, k: int) -> tuple[Any, Any, Any]:
    """For rows of logits (bfloat16 or float32, contiguous rows) and 1/temperature per row: the k
    largest logits of each row in descending order (ties: lower id first) as (ids, logits * 1/T),
    and log of the normaliser sum(exp(logits * 1/T)) in float64. So a candidate's probability is
    exp(scaled - lse), its exact share of the whole vocabulary."""
    import torch

    n, vocab = logits.shape
    if logits.dtype not in (torch.bfloat16, torch.float32) or logits.stride(1) != 1:
        raise ValueError("top_candidates needs bfloat16 or float32 logits with contiguous rows")
    inv = inv_temperature.to(torch.float32).contiguous()
    ids = torch.empty(n, k, dtype=torch.int64)
    vals = torch.empty(n, k, dtype=torch.float32)
    lse = torch.empty(n, dtype=torch.float64)
    heap = torch.empty(k * CAND_BYTES, dtype=torch.uint8)
    status = kernels.candidates(logits.data_ptr(), int(logits.dtype == torch.bfloat16), n, vocab, logits.stride(0),
                                inv.data_ptr(), k, ids.data_ptr(), vals.data_ptr(), lse.data_ptr(), heap.data_ptr())
    if status:
        raise ValueError(f"top_candidates rejected its arguments (status {status})")
    return ids, vals, lse
