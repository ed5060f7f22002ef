/* Fused byte-plane kernels for the chunk codec.
 *
 * split: element bytes -> byte planes, after an optional delta against a base (XOR, or zigzag of
 *        the wrapping integer difference) and an optional rotate-left-by-one of each element.
 * merge: the exact inverse, writing interleaved elements straight into the output buffer.
 * One pass over the data each way, where numpy needs five or six; the codec's Python code keeps
 * the format, the checks and the entropy coding. Elements are little-endian, 1/2/4/8 bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
static void merge_##W(uint8_t *out, const uint8_t *base, const uint8_t **planes, Py_ssize_t rows, \
                      int rot, int delta) {                                                    \
    const int bits = 8 * W;                                                                    \
    for (Py_ssize_t i = 0; i < rows; i++) {                                                    \
        T v = 0;                                                                               \
        for (int k = 0; k < W; k++) v |= (T)((T)planes[k][i] << (8 * k));                      \
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

/* merge(out, planes, width, rot, delta, base_or_None): planes are buffers of len(out)/width */
static PyObject *py_merge(PyObject *self, PyObject *args) {
    Py_buffer out = {0}, base = {0}, pv[8];
    int width, rot, delta, got = 0;
    PyObject *planes_obj, *base_obj, *ret = NULL;
    const uint8_t *planes[8];
    if (!PyArg_ParseTuple(args, "w*OipiO", &out, &planes_obj, &width, &rot, &delta, &base_obj)) return NULL;
    if (base_obj != Py_None && PyObject_GetBuffer(base_obj, &base, PyBUF_SIMPLE) < 0) goto done;
    if (check_args(width, delta, out.len, &base) < 0) goto done;
    if (!PySequence_Check(planes_obj) || PySequence_Size(planes_obj) != width) {
        PyErr_SetString(PyExc_ValueError, "need one plane per element byte");
        goto done;
    }
    Py_ssize_t rows = out.len / width;
    for (; got < width; got++) {
        PyObject *p = PySequence_GetItem(planes_obj, got);
        if (!p) goto done;
        int r = PyObject_GetBuffer(p, &pv[got], PyBUF_SIMPLE);
        Py_DECREF(p);
        if (r < 0) goto done;
        if (pv[got].len != rows) {
            PyErr_SetString(PyExc_ValueError, "a plane has the wrong length");
            got++;
            goto done;
        }
        planes[got] = pv[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
        case 1: merge_1(out.buf, base.buf, planes, rows, rot, delta); break;
        case 2: merge_2(out.buf, base.buf, planes, rows, rot, delta); break;
        case 4: merge_4(out.buf, base.buf, planes, rows, rot, delta); break;
        default: merge_8(out.buf, base.buf, planes, rows, rot, delta); break;
    }
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (int k = 0; k < got; k++) PyBuffer_Release(&pv[k]);
    PyBuffer_Release(&out);
    if (base.obj) PyBuffer_Release(&base);
    return ret;
}

static PyMethodDef methods[] = {
    {"split", py_split, METH_VARARGS, "split(data, width, rot, delta, base) -> list of planes"},
    {"merge", py_merge, METH_VARARGS, "merge(out, planes, width, rot, delta, base) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "fused byte-plane kernels", -1,
                                    methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
