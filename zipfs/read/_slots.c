/* Buffers for decoded chunks, recycled from large huge-page slabs.
 *
 * Why: on a VM a first touch of fresh anonymous memory costs a page fault per 4 KiB, about
 * 1 GB/s here; allocating a new buffer per decoded chunk made page faults a quarter of the mount's
 * CPU time. A Pool hands out fixed-size Slots carved from 2 MiB-aligned slabs (madvised for
 * transparent huge pages); a Slot goes back to its pool's free list when its last reference goes,
 * and a memoryview of a Slot holds a reference, so memory is reused exactly when nothing can read
 * it any more. Everything runs under the GIL: take() and the Slot's dealloc are the only mutators.
 *
 *   pool = Pool(slot_size, max_slots)
 *   slot = pool.take(n)      # a writable buffer of n <= slot_size bytes, or None when exhausted
 *   pool.take(n, grow=False) # only a slot already mapped and free
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/mman.h>

#define SLAB_BYTES ((size_t)32 << 20)
#define HUGE_ALIGN ((size_t)2 << 20)

typedef struct {
    PyObject_HEAD
    Py_ssize_t slot_size, max_slots, slots; /* slots: carved so far */
    void **free;                            /* stack of free slot addresses */
    Py_ssize_t nfree;
    void **slabs;
    size_t *slab_len;
    Py_ssize_t nslabs;
} PoolObject;

typedef struct {
    PyObject_HEAD
    PoolObject *pool;
    uint8_t *mem;
    Py_ssize_t len;
} SlotObject;

static PyTypeObject SlotType;

/* ---- Slot ---- */

static void slot_dealloc(SlotObject *self) {
    PoolObject *pool = self->pool;
    pool->free[pool->nfree++] = self->mem;
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_DECREF(pool);
}

static int slot_getbuffer(SlotObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->mem, self->len, 0, flags);
}

static Py_ssize_t slot_length(SlotObject *self) { return self->len; }

static PyBufferProcs slot_as_buffer = {(getbufferproc)slot_getbuffer, NULL};
static PySequenceMethods slot_as_sequence = {.sq_length = (lenfunc)slot_length};

static PyTypeObject SlotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zipfs.read._slots.Slot",
    .tp_basicsize = sizeof(SlotObject),
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_as_buffer = &slot_as_buffer,
    .tp_as_sequence = &slot_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "a pooled buffer for one decoded chunk",
};

/* ---- Pool ---- */

static int pool_init(PoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"slot_size", "max_slots", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn", kwlist, &self->slot_size, &self->max_slots))
        return -1;
    if (self->free) {
        PyErr_SetString(PyExc_RuntimeError, "a Pool is initialised once");
        return -1;
    }
    if (self->slot_size <= 0 || (size_t)self->slot_size > SLAB_BYTES || self->max_slots < 0) {
        PyErr_SetString(PyExc_ValueError, "slot_size must be in (0, 32 MiB] and max_slots >= 0");
        return -1;
    }
    Py_ssize_t per_slab = (Py_ssize_t)(SLAB_BYTES / (size_t)self->slot_size);
    Py_ssize_t max_slabs = (self->max_slots + per_slab - 1) / per_slab;
    self->free = PyMem_Calloc((size_t)max_slabs * (size_t)per_slab + 1, sizeof(void *));
    self->slabs = PyMem_Calloc((size_t)max_slabs + 1, sizeof(void *));
    self->slab_len = PyMem_Calloc((size_t)max_slabs + 1, sizeof(size_t));
    if (!self->free || !self->slabs || !self->slab_len) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Map one slab, 2 MiB-aligned so the kernel can back it with huge pages, and free its slots. */
static int pool_grow(PoolObject *self) {
    size_t len = SLAB_BYTES + HUGE_ALIGN;
    uint8_t *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return -1;
    uint8_t *start = (uint8_t *)(((uintptr_t)raw + HUGE_ALIGN - 1) & ~(uintptr_t)(HUGE_ALIGN - 1));
    if (start > raw) munmap(raw, (size_t)(start - raw));
    size_t tail = (size_t)((raw + len) - (start + SLAB_BYTES));
    if (tail) munmap(start + SLAB_BYTES, tail);
#ifdef MADV_HUGEPAGE
    madvise(start, SLAB_BYTES, MADV_HUGEPAGE);
#endif
    self->slabs[self->nslabs] = start;
    self->slab_len[self->nslabs++] = SLAB_BYTES;
    Py_ssize_t count = (Py_ssize_t)(SLAB_BYTES / (size_t)self->slot_size);
    if (count > self->max_slots - self->slots) count = self->max_slots - self->slots;
    /* pushed in reverse so slots are handed out in address order */
    for (Py_ssize_t i = count - 1; i >= 0; i--)
        self->free[self->nfree++] = start + (size_t)i * (size_t)self->slot_size;
    self->slots += count;
    return 0;
}

static PyObject *pool_take(PoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n", "grow", NULL};
    Py_ssize_t n;
    int grow = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|p", kwlist, &n, &grow)) return NULL;
    if (n < 0 || n > self->slot_size) Py_RETURN_NONE;
    if (!self->nfree && (!grow || self->slots >= self->max_slots || pool_grow(self) < 0)) Py_RETURN_NONE;
    if (!self->nfree) Py_RETURN_NONE;
    SlotObject *slot = PyObject_New(SlotObject, &SlotType);
    if (!slot) return NULL;
    slot->mem = self->free[--self->nfree];
    slot->len = n;
    Py_INCREF(self);
    slot->pool = self;
    return (PyObject *)slot;
}

static void pool_dealloc(PoolObject *self) {
    /* every Slot holds a reference to its pool, so no slot is alive here */
    for (Py_ssize_t i = 0; i < self->nslabs; i++) munmap(self->slabs[i], self->slab_len[i]);
    PyMem_Free(self->free);
    PyMem_Free(self->slabs);
    PyMem_Free(self->slab_len);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *pool_get_in_use(PoolObject *self, void *closure) {
    return PyLong_FromSsize_t(self->slots - self->nfree);
}

static PyObject *pool_get_mapped(PoolObject *self, void *closure) {
    return PyLong_FromSize_t((size_t)self->nslabs * SLAB_BYTES);
}

static PyObject *pool_get_slot_size(PoolObject *self, void *closure) {
    return PyLong_FromSsize_t(self->slot_size);
}

static PyMethodDef pool_methods[] = {
    {"take", (PyCFunction)(void (*)(void))pool_take, METH_VARARGS | METH_KEYWORDS,
     "take(n, grow=True) -> a writable Slot of n bytes, or None (grow=False: only a free one)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"in_use", (getter)pool_get_in_use, NULL, "slots handed out and not yet returned", NULL},
    {"mapped", (getter)pool_get_mapped, NULL, "bytes of slabs mapped", NULL},
    {"slot_size", (getter)pool_get_slot_size, NULL, "bytes per slot", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zipfs.read._slots.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(slot_size, max_slots): fixed-size buffers recycled from huge-page slabs",
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
    .tp_init = (initproc)pool_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_slots", "pooled buffers for decoded chunks", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__slots(void) {
    if (PyType_Ready(&SlotType) < 0 || PyType_Ready(&PoolType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Pool", (PyObject *)&PoolType) < 0
            || PyModule_AddObjectRef(m, "Slot", (PyObject *)&SlotType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
