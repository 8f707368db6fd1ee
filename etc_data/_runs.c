/* etc_data._runs: apply a scheme's plan as runs of pixels (the compiled path of schemes.py).
 *
 * A plan moves whole pixels: output pixel p takes the values of source pixel s(p), reordered by a
 * per-pixel permutation of its `vpp` values and XORed with a per-pixel byte mask. Along an output
 * row of a block the source pixel advances by a constant step (a block row, a flipped row, a column
 * of a rotated block), so the plan is stored as runs:
 *
 *     dst  src  step  count  perm  mask      (int64 each; perm and mask packed one byte per value)
 *
 * meaning, for k in [0, count) and c in [0, vpp):
 *
 *     out[dst + k*vpp + c] = in[src + k*step + perm_c] ^ mask_c
 *
 * with offsets in values. schemes.py builds the runs from the plan's index and checks that they
 * reproduce it exactly; this file only copies bytes. Every run is bounds-checked against both
 * buffers before any byte is touched, and the runs must tile the output row in order (the vector
 * path relies on it: bytes it writes past a run are rewritten by the runs after it); the copy runs
 * without the GIL, so threads encrypt batches in parallel. Only the buffer protocol is used: building needs no numpy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_VPP 8

typedef struct { int64_t dst, src, step, count, perm, mask; } run_t; /* one row of the runs table */

static int
check_runs(const int64_t *runs, Py_ssize_t nruns, int vpp, Py_ssize_t m_in, Py_ssize_t m_out)
{
    int64_t next = 0; /* the runs tile the output row in order: each starts where the one before ended */
    for (Py_ssize_t r = 0; r < nruns; r++) {
        const int64_t *t = runs + 6 * r;
        int64_t dst = t[0], src = t[1], step = t[2], count = t[3];
        uint64_t perm = (uint64_t)t[4];
        if (count < 1 || dst < 0 || count > (m_out - dst) / vpp || step > m_in || step < -m_in) {
            PyErr_Format(PyExc_ValueError, "run %zd writes outside the output row", r);
            return -1;
        }
        if (dst != next) {
            PyErr_Format(PyExc_ValueError, "run %zd starts at value %lld, not where the run before it ended (%lld)",
                         r, (long long)dst, (long long)next);
            return -1;
        }
        next = dst + count * vpp;
        int64_t lo = src, hi = src + (count - 1) * step;
        if (step < 0) { int64_t x = lo; lo = hi; hi = x; }
        for (int c = 0; c < vpp; c++) {
            int64_t o = (int64_t)((perm >> (8 * c)) & 0xff);
            if (lo + o < 0 || hi + o >= m_in) {
                PyErr_Format(PyExc_ValueError, "run %zd reads outside the input row", r);
                return -1;
            }
        }
    }
    if (next != m_out) {
        PyErr_Format(PyExc_ValueError, "the runs fill %lld of the output row's %zd values", (long long)next, m_out);
        return -1;
    }
    return 0;
}

/* Read a row (an image) once in order before the runs jump around in it: the hardware prefetcher
 * streams sequential reads, while the runs' scattered first touches would each wait for memory. */
static void
warm(const uint8_t *p, Py_ssize_t len)
{
    volatile uint8_t sink = 0;
    uint8_t acc = 0;
    for (Py_ssize_t k = 0; k < len; k += 64)
        acc ^= p[k];
    sink = acc;
    (void)sink;
}

/* One run of 3-value pixels, a pixel at a time. */
static inline void
copy_run3(const uint8_t *s, uint8_t *d, int64_t step, int64_t count, uint64_t perm, uint64_t mask)
{
    const int o0 = perm & 0xff, o1 = (perm >> 8) & 0xff, o2 = (perm >> 16) & 0xff;
    const uint8_t m0 = mask & 0xff, m1 = (mask >> 8) & 0xff, m2 = (mask >> 16) & 0xff;
    for (int64_t k = 0; k < count; k++, s += step, d += 3) {
        d[0] = s[o0] ^ m0;
        d[1] = s[o1] ^ m1;
        d[2] = s[o2] ^ m2;
    }
}

static void
apply_row(const uint8_t *in, uint8_t *out, const int64_t *runs, Py_ssize_t nruns, int vpp)
{
    for (Py_ssize_t r = 0; r < nruns; r++) {
        const run_t *t = (const run_t *)runs + r;
        if (vpp == 3) {
            copy_run3(in + t->src, out + t->dst, t->step, t->count, (uint64_t)t->perm, (uint64_t)t->mask);
        } else {
            const uint8_t *s = in + t->src;
            uint8_t *d = out + t->dst;
            uint8_t o[MAX_VPP], m[MAX_VPP];
            for (int c = 0; c < vpp; c++) {
                o[c] = ((uint64_t)t->perm >> (8 * c)) & 0xff;
                m[c] = ((uint64_t)t->mask >> (8 * c)) & 0xff;
            }
            for (int64_t k = 0; k < t->count; k++, s += t->step, d += vpp)
                for (int c = 0; c < vpp; c++)
                    d[c] = s[o[c]] ^ m[c];
        }
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86_VECTOR 1
static int use_vector = 0; /* set at import when the CPU has SSE4.1 (and so SSSE3) */

/* The same copy for 3-value pixels with SSSE3/SSE4.1 byte shuffles, for runs whose offsets are a
 * permutation inside the pixel (all < 3: EtC's colour shuffle): a row run (step +-3) moves 5 pixels
 * per 16-byte load and shuffle, a column run (any other step) 4 pixels per shuffle of four 4-byte
 * loads. The last group of a run overlaps the one before it (it rewrites the same bytes) instead
 * of a scalar tail. A load may read, and a 16-byte store write, a few bytes past the run: a run is
 * taken this way only when all of that lies inside its image's row, and the bytes written past it
 * belong to later runs (sorted by destination), which are written after it. Runs that fail the
 * check, or whose offsets are not such a permutation, take the scalar loop. Same bytes as apply_row
 * (tested). */
__attribute__((target("sse4.1")))
static void
apply_row_vec(const uint8_t *in, Py_ssize_t m_in, uint8_t *out, Py_ssize_t m_out, const int64_t *runs,
              Py_ssize_t nruns)
{
    const __m128i rep = _mm_setr_epi8(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, (char)0x80);
    const __m128i fwd = _mm_setr_epi8(0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9, 12, 12, 12, (char)0x80);
    const __m128i back = _mm_setr_epi8(12, 12, 12, 9, 9, 9, 6, 6, 6, 3, 3, 3, 0, 0, 0, (char)0x80);
    const __m128i cols = _mm_setr_epi8(0, 0, 0, 4, 4, 4, 8, 8, 8, 12, 12, 12, (char)0x80, (char)0x80, (char)0x80,
                                       (char)0x80);
    const __m128i keep12 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0);
    for (Py_ssize_t r = 0; r < nruns; r++) {
        const run_t *t = (const run_t *)runs + r;
        const uint8_t *s = in + t->src;
        uint8_t *d = out + t->dst;
        const int64_t step = t->step, count = t->count;
        const uint64_t perm = (uint64_t)t->perm, mask = (uint64_t)t->mask;
        const int o0 = perm & 0xff, o1 = (perm >> 8) & 0xff, o2 = (perm >> 16) & 0xff;
        const int row = step == 3 || step == -3, group = row ? 5 : 4;
        if (o0 < 3 && o1 < 3 && o2 < 3 && count >= group) {
            /* source pixels lie in [lo, hi + 3); a group's loads reach hi + 4 at most (rows: 1 byte
             * past the highest pixel; columns: a 4-byte load there); stores reach d + 3*count + 4 */
            const uint8_t *lo = step > 0 ? s : s + (count - 1) * step, *hi = step > 0 ? s + (count - 1) * step : s;
            if (lo >= in && hi + 4 <= in + m_in && d + 3 * count + 4 <= out + m_out) {
                /* shuffle controls built in registers (bytes stored one by one and loaded as a
                 * vector would stall on store forwarding once per run): base + offsets, repeated */
                const __m128i offs = _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)perm), rep);
                const __m128i mk = _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)mask), rep);
                if (row) {
                    const __m128i ctrl = _mm_add_epi8(step > 0 ? fwd : back, offs);
                    for (int64_t k = 0;; k += 5) {
                        if (k + 5 > count)
                            k = count - 5;
                        const uint8_t *b = step > 0 ? s + 3 * k : s - 3 * (k + 4);
                        __m128i v = _mm_loadu_si128((const __m128i *)b);
                        _mm_storeu_si128((__m128i *)(d + 3 * k), _mm_xor_si128(_mm_shuffle_epi8(v, ctrl), mk));
                        if (k + 5 == count)
                            break;
                    }
                } else {
                    const __m128i ctrl = _mm_add_epi8(cols, _mm_and_si128(offs, keep12));
                    for (int64_t k = 0;; k += 4) {
                        if (k + 4 > count)
                            k = count - 4;
                        const uint8_t *p = s + k * step;
                        int32_t w0, w1, w2, w3;
                        memcpy(&w0, p, 4);
                        memcpy(&w1, p + step, 4);
                        memcpy(&w2, p + 2 * step, 4);
                        memcpy(&w3, p + 3 * step, 4);
                        __m128i v = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(w0), w1, 1),
                                                                      w2, 2), w3, 3);
                        _mm_storeu_si128((__m128i *)(d + 3 * k), _mm_xor_si128(_mm_shuffle_epi8(v, ctrl), mk));
                        if (k + 4 == count)
                            break;
                    }
                }
                continue;
            }
        }
        copy_run3(s, d, step, count, perm, mask);
    }
}
#endif

/* apply(src, out, runs, vpp): src and out are C-contiguous uint8 buffers of n rows (images) of
 * m_in and m_out bytes; runs an int64 (R, 6) C-contiguous table. */
static PyObject *
runs_apply(PyObject *self, PyObject *args)
{
    PyObject *src_o, *out_o, *runs_o;
    Py_ssize_t n;
    int vpp;
    if (!PyArg_ParseTuple(args, "OOOni", &src_o, &out_o, &runs_o, &n, &vpp))
        return NULL;
    if (vpp < 1 || vpp > MAX_VPP || n < 0) {
        PyErr_SetString(PyExc_ValueError, "values per pixel must be 1..8 and rows >= 0");
        return NULL;
    }
    Py_buffer src, out, runs;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(out_o, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (PyObject_GetBuffer(runs_o, &runs, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t nruns = runs.len / (Py_ssize_t)(6 * sizeof(int64_t));
    if (runs.len % (Py_ssize_t)(6 * sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs must be an int64 table of 6 columns");
        goto done;
    }
    if (n == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (src.len % n != 0 || out.len % n != 0) {
        PyErr_SetString(PyExc_ValueError, "buffers are not whole rows");
        goto done;
    }
    Py_ssize_t m_in = src.len / n, m_out = out.len / n;
    if (check_runs((const int64_t *)runs.buf, nruns, vpp, m_in, m_out) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        warm((const uint8_t *)src.buf + i * m_in, m_in);
#ifdef HAVE_X86_VECTOR
        if (use_vector && vpp == 3) {
            apply_row_vec((const uint8_t *)src.buf + i * m_in, m_in, (uint8_t *)out.buf + i * m_out, m_out,
                          (const int64_t *)runs.buf, nruns);
            continue;
        }
#endif
        apply_row((const uint8_t *)src.buf + i * m_in, (uint8_t *)out.buf + i * m_out,
                  (const int64_t *)runs.buf, nruns, vpp);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&runs);
    return result;
}

static PyMethodDef methods[] = {
    {"apply", runs_apply, METH_VARARGS,
     "apply(src, out, runs, n, vpp): out[i, dst+k*vpp+c] = src[i, src+k*step+perm_c] ^ mask_c for every run"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_runs",
    "Apply a scheme's plan as runs of pixels (compiled; schemes.py falls back to numpy without it).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__runs(void)
{
#ifdef HAVE_X86_VECTOR
    __builtin_cpu_init();
    use_vector = __builtin_cpu_supports("sse4.1") && !getenv("ETC_DATA_SCALAR_KERNEL");
#endif
    return PyModule_Create(&module);
}
