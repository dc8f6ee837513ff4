/*
 * cryptfs.engines._xts: AES-256-XTS over runs of data units, in native code.
 *
 * Why: the `cryptography` package needs a new XTS context per 4 KiB unit
 * (its tweak cannot be reset) and builds it with the GIL held, so it runs at
 * a fraction of OpenSSL's speed on one core.  This helper keys OpenSSL's EVP
 * cipher once per file key and, per unit, re-sets only the tweak
 * (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, tweak, -1)), with the GIL
 * released for runs large enough to be worth it.  Reads never wait with the
 * GIL held: a small run's read takes only what is in memory with it.
 *
 * The unit rules are those of cryptfs/engines/base.py and docs/format.md:
 * every unit is 4096 bytes except the last (16..4112 bytes, ciphertext
 * stealing); unit k of a run starting at unit `first` has the tweak
 * first + k as a 128-bit little-endian number; with the hole rule, a unit
 * stored as all zeros decrypts to zeros.
 *
 * Contexts: one keyed template per direction, never used to cipher; the
 * contexts that cipher are copies of it (EVP_CIPHER_CTX_copy), kept in a
 * small idle list.  The templates and the idle lists are only touched with
 * the GIL held, and a context is used by one thread at a time, so one Xts
 * object serves any number of threads.  Every unit sets its own tweak
 * before it is ciphered: a context never carries a tweak from one unit to
 * the next.  Contexts are freed with EVP_CIPHER_CTX_free, which cleanses
 * the key schedule; this module keeps no other copy of the key.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <errno.h>
#include <linux/magic.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#define PAGE 4096
#define MIN_UNIT 16
#define KEY_LEN 64
#define TWEAK_LEN 16
#define IDLE_MAX 4                /* idle contexts kept per direction */
#define GIL_RELEASE_MIN (4 * PAGE) /* smaller runs keep the GIL: releasing
                                    * and re-taking it costs more than they do,
                                    * and re-taking it can wait for another
                                    * thread's switch interval */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *keyed[2];           /* [0] decrypt, [1] encrypt; NULL once closed */
    EVP_CIPHER_CTX *idle[2][IDLE_MAX];
    int n_idle[2];
} XtsObject;

/* Raise RuntimeError with OpenSSL's first queued error, and clear the queue. */
static PyObject *
raise_openssl(const char *what)
{
    unsigned long code = ERR_get_error();
    char reason[256] = "no reason given";
    if (code)
        ERR_error_string_n(code, reason, sizeof reason);
    ERR_clear_error();
    PyErr_Format(PyExc_RuntimeError, "OpenSSL AES-256-XTS %s failed: %s", what, reason);
    return NULL;
}

static void
free_contexts(XtsObject *self)
{
    for (int enc = 0; enc < 2; enc++) {
        for (int i = 0; i < self->n_idle[enc]; i++)
            EVP_CIPHER_CTX_free(self->idle[enc][i]);
        self->n_idle[enc] = 0;
        EVP_CIPHER_CTX_free(self->keyed[enc]);
        self->keyed[enc] = NULL;
    }
}

static PyObject *
Xts_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:Xts", keywords, &key))
        return NULL;
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "AES-256-XTS needs a 64-byte key");
        return NULL;
    }
    XtsObject *self = (XtsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    for (int enc = 0; enc < 2; enc++) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        self->keyed[enc] = ctx;
        if (ctx == NULL
            || EVP_CipherInit_ex(ctx, EVP_aes_256_xts(), NULL, key.buf, NULL, enc) != 1) {
            PyBuffer_Release(&key);
            raise_openssl("key setup");
            Py_DECREF(self);
            return NULL;
        }
    }
    PyBuffer_Release(&key);
    return (PyObject *)self;
}

static void
Xts_dealloc(XtsObject *self)
{
    free_contexts(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A context for one call (GIL held): an idle one, or a new copy of the template. */
static EVP_CIPHER_CTX *
acquire(XtsObject *self, int enc)
{
    if (self->keyed[enc] == NULL) {
        PyErr_SetString(PyExc_ValueError, "session is closed");
        return NULL;
    }
    if (self->n_idle[enc])
        return self->idle[enc][--self->n_idle[enc]];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_CIPHER_CTX_copy(ctx, self->keyed[enc]) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        raise_openssl("context copy");
        return NULL;
    }
    return ctx;
}

/* Give a context back (GIL held); freed if the object was closed meanwhile. */
static void
release(XtsObject *self, int enc, EVP_CIPHER_CTX *ctx)
{
    if (self->keyed[enc] != NULL && self->n_idle[enc] < IDLE_MAX)
        self->idle[enc][self->n_idle[enc]++] = ctx;
    else
        EVP_CIPHER_CTX_free(ctx);
}

static int
all_zero(const unsigned char *p, size_t n)
{
    /* Ciphertext almost never starts with a zero AES block: test that first. */
    for (size_t i = 0; i < n && i < MIN_UNIT; i++)
        if (p[i])
            return 0;
    return n <= MIN_UNIT || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Cipher every unit of src[0:length] into dst; 0 on success, -1 on an OpenSSL error. */
static int
crypt_run(EVP_CIPHER_CTX *ctx, unsigned long long first, const unsigned char *src,
          unsigned char *dst, Py_ssize_t length, int holes)
{
    Py_ssize_t count = (length - MIN_UNIT + PAGE - 1) / PAGE;
    if (count == 0)
        count = 1;
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_ssize_t start = k * PAGE;
        int size = (int)(k == count - 1 ? length - start : PAGE);
        if (holes && all_zero(src + start, (size_t)size)) {
            memset(dst + start, 0, (size_t)size);
            continue;
        }
        /* tweak = first + k, 128-bit little endian (carry into the high half) */
        unsigned long long low = first + (unsigned long long)k;
        unsigned long long high = low < first;
        unsigned char tweak[TWEAK_LEN];
        for (int i = 0; i < 8; i++) {
            tweak[i] = (unsigned char)(low >> (8 * i));
            tweak[8 + i] = (unsigned char)(high >> (8 * i));
        }
        int out = 0;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, tweak, -1) != 1
            || EVP_CipherUpdate(ctx, dst + start, &out, src + start, size) != 1
            || out != size)
            return -1;
    }
    return 0;
}

static PyObject *
run_call(XtsObject *self, PyObject *args, int enc)
{
    PyObject *first_obj;
    Py_buffer src, dst;
    int holes = 0, failed;
    if (!PyArg_ParseTuple(args, "O!y*w*|p", &PyLong_Type, &first_obj, &src, &dst, &holes))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    /* OverflowError for a negative index or one past 64 bits, like tweak() */
    unsigned long long first = PyLong_AsUnsignedLongLong(first_obj);
    if (first == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    if (src.len < MIN_UNIT) {
        PyErr_Format(PyExc_ValueError, "a run must be at least %d bytes, not %zd",
                     MIN_UNIT, src.len);
        goto done;
    }
    if (dst.len < src.len) {
        PyErr_Format(PyExc_ValueError, "output buffer of %zd bytes for a %zd-byte run",
                     dst.len, src.len);
        goto done;
    }
    ctx = acquire(self, enc);
    if (ctx == NULL)
        goto done;
    if (src.len >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        failed = crypt_run(ctx, first, src.buf, dst.buf, src.len, holes);
        Py_END_ALLOW_THREADS
    } else {
        failed = crypt_run(ctx, first, src.buf, dst.buf, src.len, holes);
    }
    if (failed) {
        EVP_CIPHER_CTX_free(ctx);  /* state unknown: never reuse it */
        raise_openssl(enc ? "encryption" : "decryption");
        goto done;
    }
    release(self, enc, ctx);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* pread exactly n bytes at offset (GIL released by the caller if it wants);
 * returns 0, or the errno of a failed pread, or -1 if the file ended first. */
static int
pread_full(int fd, unsigned char *buf, Py_ssize_t n, long long offset)
{
    Py_ssize_t done = 0;
    while (done < n) {
        ssize_t got = pread(fd, buf + done, (size_t)(n - done), (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (got == 0)
            return -1;
        done += got;
    }
    return 0;
}

/* Read the prefix of n bytes at offset that is in memory, without waiting
 * (preadv2 with RWF_NOWAIT), so it may run with the GIL held; returns the
 * bytes read (it stops at the first page not in memory, at the end of the
 * file, or on an error, which the blocking read then reports), or -1 if
 * the filesystem cannot read without waiting. */
static Py_ssize_t
pread_nowait(int fd, unsigned char *buf, Py_ssize_t n, long long offset)
{
#ifdef RWF_NOWAIT
    Py_ssize_t done = 0;
    while (done < n) {
        struct iovec iov = {buf + done, (size_t)(n - done)};
        ssize_t got = preadv2(fd, &iov, 1, (off_t)(offset + done), RWF_NOWAIT);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (done == 0 && (errno == EOPNOTSUPP || errno == EINVAL))
                return -1;
            break;
        }
        if (got == 0)
            break;
        done += got;
    }
    return done;
#else
    return -1;
#endif
}

/* tmpfs or ramfs (which cannot answer RWF_NOWAIT): reads never wait for a disk. */
static int
in_memory(int fd)
{
    struct statfs st;
    return fstatfs(fd, &st) == 0 && (st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC);
}

/* pread exactly n bytes at offset, never waiting with the GIL held: what is
 * in memory is read with it, anything that may wait (a disk, a backing
 * filesystem that does not answer) without it.  Returns as pread_full. */
static int
pread_gil_held(int fd, unsigned char *buf, Py_ssize_t n, long long offset)
{
    int read_error = 0;
    Py_ssize_t done = pread_nowait(fd, buf, n, offset);
    if (done < 0 && in_memory(fd))
        return pread_full(fd, buf, n, offset);
    if (done < 0)
        done = 0;
    if (done < n) {
        Py_BEGIN_ALLOW_THREADS
        read_error = pread_full(fd, buf + done, n - done, offset + done);
        Py_END_ALLOW_THREADS
    }
    return read_error;
}

/* read(first, fd, offset, length, start, end, zero_tail) -> bytes | None
 *
 * The read path in one call: pread the run of `length` stored bytes at
 * `offset`, decrypt it in place with the hole rule, and return plaintext
 * bytes start..end of it.  None if the run's last `zero_tail` plaintext
 * bytes are not all zero (the caller's integrity check failed).  The
 * returned bytes object is the buffer the ciphertext was read into: one
 * allocation, no copy beyond a shift when start > 0. */
static PyObject *
Xts_read(XtsObject *self, PyObject *args)
{
    PyObject *first_obj;
    int fd;
    long long offset;
    Py_ssize_t length, start, end, zero_tail;
    if (!PyArg_ParseTuple(args, "O!iLnnnn:read", &PyLong_Type, &first_obj, &fd, &offset,
                          &length, &start, &end, &zero_tail))
        return NULL;
    unsigned long long first = PyLong_AsUnsignedLongLong(first_obj);
    if (first == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (length < MIN_UNIT || offset < 0 || start < 0 || end < start || end > length
        || zero_tail < 0 || zero_tail > length) {
        PyErr_Format(PyExc_ValueError, "bad run: length %zd, slice %zd..%zd, tail %zd",
                     length, start, end, zero_tail);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        return NULL;
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out);
    EVP_CIPHER_CTX *ctx = acquire(self, 0);
    if (ctx == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    int read_error, failed = 0;
    if (length >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        read_error = pread_full(fd, buf, length, offset);
        if (!read_error)
            failed = crypt_run(ctx, first, buf, buf, length, 1);
        Py_END_ALLOW_THREADS
    } else {  /* deciphered with the GIL held; the read never waits with it */
        read_error = pread_gil_held(fd, buf, length, offset);
        if (!read_error)
            failed = crypt_run(ctx, first, buf, buf, length, 1);
    }
    if (failed) {
        EVP_CIPHER_CTX_free(ctx);
        Py_DECREF(out);
        return raise_openssl("decryption");
    }
    release(self, 0, ctx);
    if (read_error) {
        Py_DECREF(out);
        if (read_error > 0) {
            errno = read_error;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        PyErr_Format(PyExc_EOFError, "backing file ended before byte %lld of a %zd-byte run "
                     "at %lld", offset + length, length, offset);
        return NULL;
    }
    for (Py_ssize_t i = length - zero_tail; i < length; i++) {
        if (buf[i]) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
    }
    if (start)
        memmove(buf, buf + start, (size_t)(end - start));
    if (end - start != length && _PyBytes_Resize(&out, end - start) < 0)
        return NULL;
    return out;
}

static PyObject *
Xts_encrypt(XtsObject *self, PyObject *args)
{
    return run_call(self, args, 1);
}

static PyObject *
Xts_decrypt(XtsObject *self, PyObject *args)
{
    return run_call(self, args, 0);
}

static PyObject *
Xts_close(XtsObject *self, PyObject *Py_UNUSED(ignored))
{
    free_contexts(self);  /* contexts in use are freed when their call ends */
    Py_RETURN_NONE;
}

static PyMethodDef Xts_methods[] = {
    {"encrypt", (PyCFunction)Xts_encrypt, METH_VARARGS,
     "encrypt(first, src, dst): encrypt the run src (first unit index first) into dst."},
    {"decrypt", (PyCFunction)Xts_decrypt, METH_VARARGS,
     "decrypt(first, src, dst, holes=False): decrypt the run src into dst; with holes,\n"
     "units stored as all zeros come out as zeros."},
    {"read", (PyCFunction)Xts_read, METH_VARARGS,
     "read(first, fd, offset, length, start, end, zero_tail): pread and decrypt (holes\n"
     "as zeros) the run of length stored bytes at offset; plaintext bytes start..end,\n"
     "or None if the run's last zero_tail plaintext bytes are not zero."},
    {"close", (PyCFunction)Xts_close, METH_NOARGS,
     "Free (and so cleanse) the keyed contexts.  Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject XtsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cryptfs.engines._xts.Xts",
    .tp_doc = "Xts(key): AES-256-XTS under one 64-byte key, for runs of data units.",
    .tp_basicsize = sizeof(XtsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Xts_new,
    .tp_dealloc = (destructor)Xts_dealloc,
    .tp_methods = Xts_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cryptfs.engines._xts",
    .m_doc = "AES-256-XTS runs over OpenSSL's EVP interface, with the GIL released.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__xts(void)
{
    if (PyType_Ready(&XtsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Xts", (PyObject *)&XtsType) < 0
        || PyModule_AddStringConstant(m, "OPENSSL_VERSION",
                                      OpenSSL_version(OPENSSL_VERSION)) < 0
        || PyModule_AddIntConstant(m, "GIL_RELEASE_MIN", GIL_RELEASE_MIN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
