/* Fused byte-plane kernels for the chunk codec.
 *
 * split: element bytes -> byte planes, after an optional delta against a base (XOR, or zigzag of
 *        the wrapping integer difference) and an optional rotate-left-by-one of each element.
 * merge: the exact inverse, writing interleaved elements straight into the output buffer (used
 *        by decode).
 * decode: a whole chunk payload (format in chunk.py) into a caller's buffer, with the GIL released
 *        throughout: zstd planes go through a per-thread scratch area and decompression context
 *        that are reused, so a decode touches no fresh memory (first-touch page faults cost more
 *        than the entropy decoding on a VM) and the read path's threads decode in parallel.
 * One pass over the data each way, where numpy needs five or six; the codec's Python code keeps
 * the encoder's choices and the entropy coding of encode. Elements are little-endian, 1/2/4/8 bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "zipfs planes kernel assumes a little-endian machine"
#endif

enum { DELTA_NONE = 0, DELTA_XOR = 1, DELTA_SUB = 4 };

#define KERNELS(T, W)                                                                         \
static void split_##W(const uint8_t *in, const uint8_t *base, uint8_t **planes, Py_ssize_t rows, \
                      int rot, int delta) {                                                    \
    const int bits = 8 * W;                                                                    \
    for (Py_ssize_t i = 0; i < rows; i++) {                                                    \
        T v, b;                                                                                \
        memcpy(&v, in + i * W, W);                                                             \
        if (delta) {                                                                           \
            memcpy(&b, base + i * W, W);                                                       \
            if (delta == DELTA_XOR) {                                                          \
                v ^= b;                                                                        \
            } else {                                                                           \
                T d = (T)(v - b);                                                              \
                v = (T)((T)(d << 1) ^ (T)(0 - (T)(d >> (bits - 1))));                          \
            }                                                                                  \
        }                                                                                      \
        if (rot) v = (T)((T)(v << 1) | (T)(v >> (bits - 1)));                                  \
        for (int k = 0; k < W; k++) planes[k][i] = (uint8_t)(v >> (8 * k));                    \
    }                                                                                          \
}                                                                                              \
/* plane pointers as restrict locals: the planes never alias the output, and saying so lets the \
 * compiler vectorize the loop (W is a constant, so unused planes drop out) */                 \
static inline __attribute__((always_inline)) void                                             \
merge_##W##_as(uint8_t *restrict out, const uint8_t *restrict base,                              \
               const uint8_t *const *planes, Py_ssize_t rows, const int rot, const int delta) {\
    const int bits = 8 * W;                                                                    \
    const uint8_t *restrict p0 = planes[0];                                                    \
    const uint8_t *restrict p1 = W > 1 ? planes[1] : p0;                                       \
    const uint8_t *restrict p2 = W > 2 ? planes[2] : p0;                                       \
    const uint8_t *restrict p3 = W > 2 ? planes[3] : p0;                                       \
    const uint8_t *restrict p4 = W > 4 ? planes[4] : p0;                                       \
    const uint8_t *restrict p5 = W > 4 ? planes[5] : p0;                                       \
    const uint8_t *restrict p6 = W > 4 ? planes[6] : p0;                                       \
    const uint8_t *restrict p7 = W > 4 ? planes[7] : p0;                                       \
    for (Py_ssize_t i = 0; i < rows; i++) {                                                    \
        uint64_t w = p0[i];                                                                    \
        if (W > 1) w |= (uint64_t)p1[i] << 8;                                                  \
        if (W > 2) w |= (uint64_t)p2[i] << 16 | (uint64_t)p3[i] << 24;                         \
        if (W > 4) w |= (uint64_t)p4[i] << 32 | (uint64_t)p5[i] << 40 | (uint64_t)p6[i] << 48   \
                        | (uint64_t)p7[i] << 56;                                               \
        T v = (T)w;                                                                            \
        if (rot) v = (T)((T)(v >> 1) | (T)(v << (bits - 1)));                                  \
        if (delta) {                                                                           \
            T b;                                                                               \
            memcpy(&b, base + i * W, W);                                                       \
            if (delta == DELTA_XOR) {                                                          \
                v ^= b;                                                                        \
            } else {                                                                           \
                v = (T)(b + (T)((T)(v >> 1) ^ (T)(0 - (T)(v & 1))));                           \
            }                                                                                  \
        }                                                                                      \
        memcpy(out + i * W, &v, W);                                                            \
    }                                                                                          \
}                                                                                              \
/* one loop per (rot, delta) with both constant: no branch is left inside for the vectorizer */ \
static void merge_##W(uint8_t *out, const uint8_t *base, const uint8_t *const *planes,             \
                      Py_ssize_t rows, int rot, int delta) {                                   \
    if (delta == DELTA_SUB) {                                                                  \
        if (rot) merge_##W##_as(out, base, planes, rows, 1, DELTA_SUB);                        \
        else merge_##W##_as(out, base, planes, rows, 0, DELTA_SUB);                            \
    } else if (delta == DELTA_XOR) {                                                           \
        if (rot) merge_##W##_as(out, base, planes, rows, 1, DELTA_XOR);                        \
        else merge_##W##_as(out, base, planes, rows, 0, DELTA_XOR);                            \
    } else if (rot) {                                                                          \
        merge_##W##_as(out, base, planes, rows, 1, DELTA_NONE);                                \
    } else {                                                                                   \
        merge_##W##_as(out, base, planes, rows, 0, DELTA_NONE);                                \
    }                                                                                          \
}

KERNELS(uint8_t, 1)
KERNELS(uint16_t, 2)
KERNELS(uint32_t, 4)
KERNELS(uint64_t, 8)

static int check_args(int width, int delta, Py_ssize_t n, Py_buffer *base) {
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 1, 2, 4 or 8");
        return -1;
    }
    if (delta != DELTA_NONE && delta != DELTA_XOR && delta != DELTA_SUB) {
        PyErr_SetString(PyExc_ValueError, "delta must be NONE, XOR or SUB");
        return -1;
    }
    if (n % width) {
        PyErr_SetString(PyExc_ValueError, "length is not a whole number of elements");
        return -1;
    }
    if (delta && (base->buf == NULL || base->len != n)) {
        PyErr_SetString(PyExc_ValueError, "a delta needs a base of the same length");
        return -1;
    }
    return 0;
}

/* split(data, width, rot, delta, base_or_None) -> list of `width` bytes objects */
static PyObject *py_split(PyObject *self, PyObject *args) {
    Py_buffer data = {0}, base = {0};
    int width, rot, delta;
    PyObject *base_obj;
    if (!PyArg_ParseTuple(args, "y*ipiO", &data, &width, &rot, &delta, &base_obj)) return NULL;
    PyObject *result = NULL;
    uint8_t *planes[8];
    if (base_obj != Py_None && PyObject_GetBuffer(base_obj, &base, PyBUF_SIMPLE) < 0) goto done;
    if (check_args(width, delta, data.len, &base) < 0) goto done;
    Py_ssize_t rows = data.len / width;
    result = PyList_New(width);
    if (!result) goto done;
    for (int k = 0; k < width; k++) {
        PyObject *p = PyBytes_FromStringAndSize(NULL, rows);
        if (!p) { Py_CLEAR(result); goto done; }
        planes[k] = (uint8_t *)PyBytes_AS_STRING(p);
        PyList_SET_ITEM(result, k, p);
    }
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
        case 1: split_1(data.buf, base.buf, planes, rows, rot, delta); break;
        case 2: split_2(data.buf, base.buf, planes, rows, rot, delta); break;
        case 4: split_4(data.buf, base.buf, planes, rows, rot, delta); break;
        default: split_8(data.buf, base.buf, planes, rows, rot, delta); break;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&data);
    if (base.obj) PyBuffer_Release(&base);
    return result;
}

/* ---- decode ---- */

enum { VERSION = 1, FLAG_ROTL1 = 2, M_RAW = 0, M_ZSTD = 1, M_CONST = 2, HEAD = 8, PLANE_HEAD = 5 };

/* per-thread decompression context and plane scratch, freed when the thread exits */
typedef struct {
    ZSTD_DCtx *dctx;
    uint8_t *scratch;
    size_t cap;
} tls_t;

static pthread_key_t tls_key;

static void tls_free(void *p) {
    tls_t *t = p;
    if (!t) return;
    ZSTD_freeDCtx(t->dctx);
    free(t->scratch);
    free(t);
}

static tls_t *tls_get(size_t need) {
    tls_t *t = pthread_getspecific(tls_key);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t) return NULL;
        t->dctx = ZSTD_createDCtx();
        if (!t->dctx || pthread_setspecific(tls_key, t)) {
            ZSTD_freeDCtx(t->dctx);
            free(t);
            return NULL;
        }
    }
    if (t->cap < need) {
        free(t->scratch);
        t->scratch = malloc(need);
        t->cap = t->scratch ? need : 0;
        if (!t->scratch) return NULL;
    }
    return t;
}

static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* Decode planes and merge them into out; returns NULL or an error message (in err). */
static const char *decode_body(const uint8_t *base, uint8_t *out, Py_ssize_t n,
                               int width, int rot, int delta, const int *method, const uint8_t **src,
                               const uint32_t *size, char *err, size_t errlen) {
    Py_ssize_t rows = n / width;
    const uint8_t *planes[8];
    /* one zstd plane of single bytes with no delta decodes straight into the output */
    int direct = width == 1 && !delta && method[0] == M_ZSTD;
    tls_t *t = NULL;
    if (!direct) {
        int scratched = 0;
        for (int k = 0; k < width; k++) scratched += method[k] != M_RAW;
        if (scratched && !(t = tls_get((size_t)rows * (size_t)scratched))) return "out of memory for decode scratch";
    } else if (!(t = tls_get(0))) {
        return "out of memory for a decompression context";
    }
    uint8_t *next = t ? t->scratch : NULL;
    for (int k = 0; k < width; k++) {
        if (method[k] == M_RAW) {
            planes[k] = src[k];
            continue;
        }
        uint8_t *dst = direct ? out : next;
        if (!direct) next += rows;
        if (method[k] == M_CONST) {
            memset(dst, src[k][0], (size_t)rows);
        } else if (rows) {
            size_t got = ZSTD_decompressDCtx(t->dctx, dst, (size_t)rows, src[k], size[k]);
            if (ZSTD_isError(got)) {
                snprintf(err, errlen, "zstd plane does not decode: %s", ZSTD_getErrorName(got));
                return err;
            }
            if (got != (size_t)rows) return "zstd plane has the wrong length";
        }
        planes[k] = dst;
    }
    if (direct) return NULL;
    switch (width) {
        case 1: merge_1(out, base, planes, rows, rot, delta); break;
        case 2: merge_2(out, base, planes, rows, rot, delta); break;
        case 4: merge_4(out, base, planes, rows, rot, delta); break;
        default: merge_8(out, base, planes, rows, rot, delta); break;
    }
    return NULL;
}

/* Check the header and plane table and decode; NULL or the error message. Runs without the GIL:
 * the payload is usually a view into the store's map, and its first touch may wait on the disk. */
static const char *decode_payload(const uint8_t *p, Py_ssize_t len, const uint8_t *base, Py_ssize_t base_len,
                                  uint8_t *out, Py_ssize_t out_len, char *err, size_t errlen) {
    int method[8];
    const uint8_t *src[8];
    uint32_t size[8];
    if (len < HEAD) return "chunk payload is truncated";
    int version = p[0], flags = p[1], width = p[2];
    Py_ssize_t n = le32(p + 4);
    int delta = flags & (DELTA_XOR | DELTA_SUB);
    if (version != VERSION || (width != 1 && width != 2 && width != 4 && width != 8) || n % width
            || flags & ~7 || delta == (DELTA_XOR | DELTA_SUB)) {
        snprintf(err, errlen, "chunk payload header is invalid (version %d, width %d)", version, width);
        return err;
    }
    Py_ssize_t rows = n / width, pos = HEAD + width * PLANE_HEAD;
    if (len < pos) return "chunk payload is truncated";
    for (int k = 0; k < width; k++) {
        method[k] = p[HEAD + k * PLANE_HEAD];
        size[k] = le32(p + HEAD + k * PLANE_HEAD + 1);
        src[k] = p + pos;
        if ((Py_ssize_t)size[k] > len - pos) return "chunk payload is truncated";
        pos += size[k];
        if (!((method[k] == M_CONST && size[k] == 1) || (method[k] == M_RAW && size[k] == rows)
              || method[k] == M_ZSTD)) {
            snprintf(err, errlen, "plane %d has invalid method %d or size %u", k, method[k], size[k]);
            return err;
        }
    }
    if (pos != len) return "chunk payload has trailing bytes";
    if (delta && (!base || base_len != n)) return "delta chunk decoded without its base chunk";
    if (out_len != n) {
        snprintf(err, errlen, "chunk payload decodes to %zd bytes, not the %zd expected", n, out_len);
        return err;
    }
    return decode_body(delta ? base : NULL, out, n, width, flags & FLAG_ROTL1, delta, method, src, size, err,
                       errlen);
}

/* decode(payload, base_or_None, out): decode into out, which must be exactly the decoded size;
 * ValueError names what is malformed */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer pl = {0}, base = {0}, out = {0};
    PyObject *base_obj;
    const char *msg;
    char err[200];
    if (!PyArg_ParseTuple(args, "y*Ow*", &pl, &base_obj, &out)) return NULL;
    if (base_obj != Py_None && PyObject_GetBuffer(base_obj, &base, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&pl);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    msg = decode_payload(pl.buf, pl.len, base.buf, base.len, out.buf, out.len, err, sizeof err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&pl);
    PyBuffer_Release(&out);
    if (base.obj) PyBuffer_Release(&base);
    if (msg) {
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split", py_split, METH_VARARGS, "split(data, width, rot, delta, base) -> list of planes"},
    {"decode", py_decode, METH_VARARGS, "decode(payload, base, out) -> None; ValueError if malformed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "fused byte-plane kernels", -1,
                                    methods};

PyMODINIT_FUNC PyInit__planes(void) {
    if (pthread_key_create(&tls_key, tls_free)) return PyErr_NoMemory();
    return PyModule_Create(&module);
}
