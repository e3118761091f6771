/*
 * The pseudonym engine's hot loop in C (DESIGN.md §4), optional: every function here has a
 * pure-Python definition in mac.py / formats.py / copytext.py / sealer.py that the tests compare it
 * with, value for value.
 *
 * Keyed(key, label)   HMAC-SHA256(key, label + message) with the inner and outer SHA-256 states
 *                     computed once (RFC 2104); .mac(m), .mac_many([m, ...]).
 * copy_block(...)     a block of PostgreSQL COPY text rows in, COPY text rows out: fields split,
 *                     pseudonymised columns unescaped, NFC-normalised (through a Python callback,
 *                     only for non-ASCII values), HMAC'd and encoded, kept columns copied as they
 *                     are, dropped columns left out; no Python object per row. The GIL is released
 *                     while it runs, so reading and writing the database overlap with hashing.
 *                     Secondary columns also count the values not written in the source project's
 *                     format (PseudonymFormat.matches is the definition).
 *
 * seal_rows(...)      escrow rows for PostgreSQL's COPY: every value sealed with AES-256-GCM under the
 *                     batch's data key (counter nonces, associated data project NUL pseudonym),
 *                     as sealer.BatchSealer does with the cryptography package. Only native.py imports
 *                     this module (typed by _native.pyi).
 *
 * SHA-256 and AES-GCM are OpenSSL's (libcrypto), which uses the CPU's SHA extensions where there are some.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

/* --- Keyed ----------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    SHA256_CTX inner; /* after (key ^ ipad) and the label */
    SHA256_CTX outer; /* after (key ^ opad) */
} KeyedObject;

static inline void keyed_mac(const KeyedObject *k, const unsigned char *msg, size_t len, unsigned char *out) {
    SHA256_CTX ctx = k->inner;
    unsigned char inner[32];
    SHA256_Update(&ctx, msg, len);
    SHA256_Final(inner, &ctx);
    ctx = k->outer;
    SHA256_Update(&ctx, inner, 32);
    SHA256_Final(out, &ctx);
}

static int Keyed_init(KeyedObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "label", NULL};
    Py_buffer key, label;
    unsigned char block[64], pad[64];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*", kwlist, &key, &label))
        return -1;
    memset(block, 0, sizeof block);
    if (key.len > 64)
        SHA256((const unsigned char *)key.buf, (size_t)key.len, block);
    else
        memcpy(block, key.buf, (size_t)key.len);
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x36;
    SHA256_Init(&self->inner);
    SHA256_Update(&self->inner, pad, 64);
    SHA256_Update(&self->inner, label.buf, (size_t)label.len);
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&self->outer);
    SHA256_Update(&self->outer, pad, 64);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    PyBuffer_Release(&key);
    PyBuffer_Release(&label);
    return 0;
}

static void Keyed_dealloc(KeyedObject *self) {
    OPENSSL_cleanse(&self->inner, sizeof self->inner);
    OPENSSL_cleanse(&self->outer, sizeof self->outer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Keyed_mac(KeyedObject *self, PyObject *arg) {
    Py_buffer msg;
    unsigned char out[32];
    if (PyObject_GetBuffer(arg, &msg, PyBUF_SIMPLE) < 0)
        return NULL;
    keyed_mac(self, msg.buf, (size_t)msg.len, out);
    PyBuffer_Release(&msg);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *Keyed_mac_many(KeyedObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "mac_many takes a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *result = PyBytes_FromStringAndSize(NULL, 32 * n);
    const char **ptrs = PyMem_Malloc(sizeof(char *) * (size_t)(n ? n : 1));
    Py_ssize_t *lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    if (result == NULL || ptrs == NULL || lens == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "mac_many takes bytes, not %.80s", Py_TYPE(items[i])->tp_name);
            goto fail;
        }
        ptrs[i] = PyBytes_AS_STRING(items[i]);
        lens[i] = PyBytes_GET_SIZE(items[i]);
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        keyed_mac(self, (const unsigned char *)ptrs[i], (size_t)lens[i], out + 32 * i);
    Py_END_ALLOW_THREADS
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_DECREF(seq);
    return result;
fail:
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_XDECREF(result);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef Keyed_methods[] = {
    {"mac", (PyCFunction)Keyed_mac, METH_O, "HMAC of one message (label prepended)."},
    {"mac_many", (PyCFunction)Keyed_mac_many, METH_O, "HMACs of a sequence of bytes, 32 bytes each, one after the other."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Keyed_repr(PyObject *self) { return PyUnicode_FromString("<Keyed HMAC-SHA256 (key hidden)>"); }

static PyTypeObject KeyedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pseudonymise.core._native.Keyed",
    .tp_basicsize = sizeof(KeyedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Keyed(key, label): HMAC-SHA256(key, label + message) with precomputed inner/outer states.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Keyed_init,
    .tp_dealloc = (destructor)Keyed_dealloc,
    .tp_methods = Keyed_methods,
    .tp_repr = Keyed_repr,
};

/* --- growable buffers (no GIL needed) ---------------------------------------------------------- */
typedef struct {
    unsigned char *data;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    unsigned char *data = realloc(b->data, cap);
    if (data == NULL)
        return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *src, size_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

/* --- encoders (formats.py is the definition) --------------------------------------------------- */
enum { ALPHA_HEX = 0, ALPHA_BASE32 = 1, ALPHA_BASE64URL = 2, ALPHA_DIGITS = 3 };
static const char HEX[] = "0123456789abcdef";
static const char B32[] = "abcdefghijklmnopqrstuvwxyz234567";
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* The last `length` decimal digits of the MAC read as a big-endian integer, zero-padded. */
static void encode_digits(const unsigned char *mac, int length, char *out) {
    uint64_t limbs[4];
    char digits[80];
    for (int i = 0; i < 4; i++) {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) v = (v << 8) | mac[8 * i + k];
        limbs[i] = v;
    }
    memset(digits, '0', sizeof digits);
    int pos = 80;
    const uint64_t base = 10000000000000000000ull; /* 10**19 */
    for (int chunk = 0; chunk < 5 && pos > 0; chunk++) {
        unsigned __int128 rem = 0;
        for (int i = 0; i < 4; i++) {
            unsigned __int128 cur = (rem << 64) | limbs[i];
            limbs[i] = (uint64_t)(cur / base);
            rem = cur % base;
        }
        uint64_t r = (uint64_t)rem;
        for (int k = 0; k < 19 && pos > 0; k++) {
            digits[--pos] = (char)('0' + r % 10);
            r /= 10;
        }
    }
    memcpy(out, digits + 80 - length, (size_t)length);
}

/* Symbols of `bits` bits (5 or 6) read in groups: 5 bytes give 8 base32 symbols, 3 bytes give 4
 * base64url symbols; bytes past the MAC's 32 are zero (RFC 4648 padding bits). */
static inline void encode_groups(const unsigned char *mac, int bits, const char *alphabet, int length, char *out) {
    const int group_bytes = bits == 5 ? 5 : 3, group_symbols = 8 * group_bytes / bits;
    const unsigned mask = (1u << bits) - 1;
    for (int j = 0, start = 0; j < length; start += group_bytes) {
        uint64_t v = 0;
        for (int k = 0; k < group_bytes; k++) v = (v << 8) | (start + k < 32 ? mac[start + k] : 0);
        for (int i = 0; i < group_symbols && j < length; i++, j++)
            out[j] = alphabet[(v >> (8 * group_bytes - bits * (i + 1))) & mask];
    }
}

static inline void encode_mac(const unsigned char *mac, int alphabet, int length, char *out) {
    switch (alphabet) {
    case ALPHA_HEX:
        for (int j = 0; j < length; j++) out[j] = HEX[(mac[j / 2] >> (j % 2 ? 0 : 4)) & 15];
        break;
    case ALPHA_BASE32:
        encode_groups(mac, 5, B32, length, out);
        break;
    case ALPHA_BASE64URL:
        encode_groups(mac, 6, B64, length, out);
        break;
    default:
        encode_digits(mac, length, out);
    }
}

static PyObject *py_encode(PyObject *module, PyObject *args) {
    Py_buffer macs, prefix = {0};
    int alphabet, length;
    if (!PyArg_ParseTuple(args, "y*ii|y*", &macs, &alphabet, &length, &prefix))
        return NULL;
    PyObject *out = NULL;
    if (macs.len % 32 || alphabet < 0 || alphabet > 3 || length < 1 || length > 77) {
        PyErr_SetString(PyExc_ValueError, "encode(macs, alphabet, length[, prefix]): 32-byte MACs, alphabet 0-3, length 1-77");
        goto done;
    }
    Py_ssize_t n = macs.len / 32, width = prefix.len + length;
    out = PyBytes_FromStringAndSize(NULL, n * width);
    if (out != NULL) {
        char *o = PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (prefix.len)
                memcpy(o + i * width, prefix.buf, (size_t)prefix.len);
            encode_mac((const unsigned char *)macs.buf + 32 * i, alphabet, length, o + i * width + prefix.len);
        }
    }
done:
    PyBuffer_Release(&macs);
    if (prefix.obj != NULL)
        PyBuffer_Release(&prefix);
    return out;
}

/* --- COPY text ------------------------------------------------------------------------------- */
/* Append the UTF-8 of code point `cp` (< 0x800 here: octal and hex escapes give at most 511). */
static void put_codepoint(unsigned char **w, unsigned cp) {
    if (cp < 0x80) {
        *(*w)++ = (unsigned char)cp;
    } else {
        *(*w)++ = (unsigned char)(0xC0 | (cp >> 6));
        *(*w)++ = (unsigned char)(0x80 | (cp & 0x3F));
    }
}

static inline int is_octal(unsigned char c) { return c >= '0' && c <= '7'; }
static inline int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The value of a COPY text field with backslashes (copytext.unescape): into `out`, which has room
 * for `len` bytes (an escape never yields more bytes than it takes). Returns the length. */
static size_t unescape(const unsigned char *p, size_t len, unsigned char *out) {
    unsigned char *w = out;
    size_t i = 0;
    while (i < len) {
        unsigned char c = p[i];
        if (c != '\\' || i + 1 >= len) {
            *w++ = c;
            i++;
            continue;
        }
        unsigned char e = p[i + 1];
        if (e == 'x' && i + 2 < len && hex_value(p[i + 2]) >= 0) {
            unsigned v = (unsigned)hex_value(p[i + 2]);
            size_t used = 3;
            if (i + 3 < len && hex_value(p[i + 3]) >= 0) {
                v = v * 16 + (unsigned)hex_value(p[i + 3]);
                used = 4;
            }
            put_codepoint(&w, v);
            i += used;
        } else if (is_octal(e)) {
            unsigned v = e - '0';
            size_t used = 2;
            while (used < 4 && i + used < len && is_octal(p[i + used])) {
                v = v * 8 + (p[i + used] - '0');
                used++;
            }
            put_codepoint(&w, v);
            i += used;
        } else {
            switch (e) {
            case 'b': *w++ = '\b'; break;
            case 'f': *w++ = '\f'; break;
            case 'n': *w++ = '\n'; break;
            case 'r': *w++ = '\r'; break;
            case 't': *w++ = '\t'; break;
            case 'v': *w++ = '\v'; break;
            default: *w++ = e;
            }
            i += 2;
        }
    }
    return (size_t)(w - out);
}

enum { ACT_KEEP = 0, ACT_DROP = 1, ACT_PSEUDONYMISE = 2 };

typedef struct {
    int action;
    KeyedObject *keyed; /* NULL: randomised (32 bytes from the OS CSPRNG per value) */
    int alphabet, length;
    const char *prefix;
    Py_ssize_t prefix_len;
    int collect; /* keep the canonical bytes (escrow) */
    PyObject *callback;           /* non-ASCII values: callable(bytes) -> canonical bytes; NULL: as they are */
    const unsigned char *program; /* normalisers for ASCII values (see ascii_normalise) */
    Py_ssize_t program_len;
    PyObject *macs;   /* bytes, 32 per value (resized at the end) */
    size_t count, nulls;
    Buf canon, offsets;
    int check;                        /* count the values not written in the format below */
    unsigned char symbols[256];       /* check: which bytes are symbols of the alphabet */
    const char *check_prefix;         /* check: the prefix, UTF-8 (not COPY-escaped) */
    Py_ssize_t check_prefix_len;
    int check_length;                 /* check: symbols after the prefix */
    size_t mismatched;
} Column;

/* Whether a value (unescaped) is the prefix then `check_length` symbols of the alphabet. */
static inline int matches_format(const Column *col, const unsigned char *value, size_t len) {
    if (len != (size_t)col->check_prefix_len + (size_t)col->check_length)
        return 0;
    if (col->check_prefix_len && memcmp(value, col->check_prefix, (size_t)col->check_prefix_len) != 0)
        return 0;
    unsigned char ok = 1; /* no early exit: the loop stays branch-free for the common case, a match */
    for (size_t i = (size_t)col->check_prefix_len; i < len; i++)
        ok &= col->symbols[value[i]];
    return ok;
}

typedef struct {
    unsigned char pool[4096];
    size_t left;
} Random;

static int random_mac(Random *r, unsigned char *out) {
    if (r->left < 32) {
        size_t got = 0;
        while (got < sizeof r->pool) {
            ssize_t n = getrandom(r->pool + got, sizeof r->pool - got, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
            got += (size_t)n;
        }
        r->left = sizeof r->pool;
    }
    memcpy(out, r->pool + sizeof r->pool - r->left, 32);
    OPENSSL_cleanse(r->pool + sizeof r->pool - r->left, 32);
    r->left -= 32;
    return 0;
}

/* Python's str.isspace() for ASCII: \t \n \v \f \r, \x1c-\x1f and space. */
static inline int ascii_space(unsigned char c) { return c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31); }

/*
 * The column's normalisers on an ASCII value, in place (policy.build_normaliser is the definition):
 * 's' strip, 'l' lower (and casefold, the same on ASCII), 'u' upper, 'w' remove whitespace,
 * 'r' n c1..cn remove those characters. Every step keeps or shortens the value. Returns the new length.
 */
static size_t ascii_normalise(const unsigned char *prog, size_t prog_len, unsigned char *v, size_t n) {
    for (size_t k = 0; k < prog_len; k++) {
        unsigned char op = prog[k];
        if (op == 's') {
            size_t a = 0, b = n;
            while (a < b && ascii_space(v[a])) a++;
            while (b > a && ascii_space(v[b - 1])) b--;
            memmove(v, v + a, b - a);
            n = b - a;
        } else if (op == 'l') {
            for (size_t i = 0; i < n; i++) if (v[i] >= 'A' && v[i] <= 'Z') v[i] += 32;
        } else if (op == 'u') {
            for (size_t i = 0; i < n; i++) if (v[i] >= 'a' && v[i] <= 'z') v[i] -= 32;
        } else if (op == 'w' || op == 'r') {
            const unsigned char *set = op == 'r' ? prog + k + 2 : NULL;
            size_t set_len = op == 'r' ? prog[k + 1] : 0, m = 0;
            for (size_t i = 0; i < n; i++) {
                int drop = set == NULL ? ascii_space(v[i]) : memchr(set, v[i], set_len) != NULL;
                if (!drop) v[m++] = v[i];
            }
            n = m;
            if (op == 'r') k += 1 + set_len;
        }
    }
    return n;
}

typedef struct {
    const char *message; /* set on failure, raised once the GIL is back */
    PyObject *exc_type;
    Py_ssize_t row;
} Failure;

/* A non-ASCII value through the column's callback (GIL held). Returns a new bytes object or NULL. */
static PyObject *call_callback(PyObject *callback, const unsigned char *value, size_t len) {
    PyObject *arg = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)len);
    if (arg == NULL)
        return NULL;
    PyObject *res = PyObject_CallOneArg(callback, arg);
    Py_DECREF(arg);
    if (res != NULL && !PyBytes_Check(res)) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "the normalisation callback must return bytes");
        return NULL;
    }
    return res;
}

/*
 * The loop. Returns 0, or -1 with `fail` filled in (or a Python exception set when `*pyerr`).
 * Runs without the GIL; takes it back only to call a column's callback.
 */
static int transform(const unsigned char *data, size_t len, int width, Column *cols,
                     unsigned char *out, size_t *out_len, Py_ssize_t *rows_out, Failure *fail, int *pyerr,
                     PyThreadState **ts) {
    const unsigned char *p = data, *end = data + len;
    unsigned char *w = out;
    Py_ssize_t rows = 0;
    Buf scratch = {0}, normal_buf = {0};
    Random rnd = {.left = 0};
    int status = -1;
    int first_out = -1;
    for (int c = 0; c < width; c++)
        if (cols[c].action != ACT_DROP) { first_out = c; break; }
    while (p < end) {
        for (int c = 0; c < width; c++) {
            const unsigned char *q = p;
            while (q < end && *q != '\t' && *q != '\n') q++;
            if (q == end) {
                fail->message = "the COPY data ended mid-row";
                goto done;
            }
            if ((c < width - 1) != (*q == '\t')) {
                fail->message = "a COPY row does not have as many fields as the source has columns";
                goto done;
            }
            size_t flen = (size_t)(q - p);
            Column *col = &cols[c];
            if (col->action != ACT_DROP && c != first_out)
                *w++ = '\t';
            if (col->action == ACT_KEEP) {
                memcpy(w, p, flen);
                w += flen;
            } else if (col->action == ACT_PSEUDONYMISE) {
                if (flen == 2 && p[0] == '\\' && p[1] == 'N') {
                    *w++ = '\\';
                    *w++ = 'N';
                    col->nulls++;
                } else {
                    const unsigned char *value = p;
                    size_t vlen = flen;
                    PyObject *normal = NULL;
                    if (memchr(p, '\\', flen) != NULL) {
                        if (buf_reserve(&scratch, flen) < 0) {
                            fail->message = "out of memory";
                            goto done;
                        }
                        vlen = unescape(p, flen, scratch.data);
                        value = scratch.data;
                    }
                    if (col->check && !matches_format(col, value, vlen))
                        col->mismatched++;
                    int ascii = 1;
                    if (col->program_len || col->callback != NULL) /* secondary columns use neither */
                        for (size_t i = 0; i < vlen; i++)
                            if (value[i] & 0x80) { ascii = 0; break; }
                    if (ascii && col->program_len) {
                        if (buf_reserve(&normal_buf, vlen + 1) < 0) {
                            fail->message = "out of memory";
                            goto done;
                        }
                        memcpy(normal_buf.data, value, vlen);
                        vlen = ascii_normalise(col->program, (size_t)col->program_len, normal_buf.data, vlen);
                        value = normal_buf.data;
                    }
                    if (col->callback != NULL) {
                        if (!ascii) {
                            PyEval_RestoreThread(*ts);
                            normal = call_callback(col->callback, value, vlen);
                            *ts = PyEval_SaveThread();
                            if (normal == NULL) {
                                *pyerr = 1;
                                fail->row = rows;
                                goto done;
                            }
                            value = (const unsigned char *)PyBytes_AS_STRING(normal);
                            vlen = (size_t)PyBytes_GET_SIZE(normal);
                        }
                    }
                    unsigned char *mac = (unsigned char *)PyBytes_AS_STRING(col->macs) + 32 * col->count;
                    if (col->keyed != NULL) {
                        keyed_mac(col->keyed, value, vlen, mac);
                    } else if (random_mac(&rnd, mac) < 0) {
                        fail->message = "the operating system's random generator failed";
                        fail->exc_type = PyExc_OSError;
                        goto done;
                    }
                    col->count++;
                    memcpy(w, col->prefix, (size_t)col->prefix_len);
                    w += col->prefix_len;
                    encode_mac(mac, col->alphabet, col->length, (char *)w);
                    w += col->length;
                    if (col->collect) {
                        uint64_t off;
                        if (buf_put(&col->canon, value, vlen) < 0) {
                            fail->message = "out of memory";
                            goto done;
                        }
                        off = col->canon.len;
                        if (buf_put(&col->offsets, &off, sizeof off) < 0) {
                            fail->message = "out of memory";
                            goto done;
                        }
                    }
                    if (normal != NULL) {
                        PyEval_RestoreThread(*ts);
                        Py_DECREF(normal);
                        *ts = PyEval_SaveThread();
                    }
                }
            }
            p = q + 1;
        }
        if (first_out >= 0)
            *w++ = '\n';
        rows++;
    }
    status = 0;
done:
    free(scratch.data);
    free(normal_buf.data);
    OPENSSL_cleanse(&rnd, sizeof rnd);
    *out_len = (size_t)(w - out);
    *rows_out = rows;
    if (status < 0 && fail->row == 0)
        fail->row = rows;
    return status;
}

static PyObject *bytes_from_buf(Buf *b) {
    return PyBytes_FromStringAndSize((const char *)b->data, (Py_ssize_t)b->len);
}

/*
 * copy_block(data, columns) -> (out, rows, results)
 *
 * data: complete rows of COPY text, each ending with a newline.
 * columns: one entry per field: (action, keyed or None, alphabet, length, prefix, collect, callback, program
 *     [, check]); prefix is already COPY-escaped UTF-8; callback (or None) turns a non-ASCII value's UTF-8
 *     into its canonical bytes (normalisers, NFC); program holds the normalisers for ASCII values
 *     (ascii_normalise); check (or None) is (alphabet, length, prefix as UTF-8): count the values
 *     (unescaped) that are not that prefix followed by `length` symbols of that alphabet.
 * results: for each pseudonymised column, in order: (macs, nulls, canonicals or None, ends or None,
 *     mismatched), where canonicals are the values' canonical bytes one after the other, ends their
 *     end offsets (native-endian uint64), and mismatched how many values failed the check (0 without one).
 */
static PyObject *py_copy_block(PyObject *module, PyObject *args) {
    Py_buffer data;
    PyObject *spec;
    if (!PyArg_ParseTuple(args, "y*O", &data, &spec))
        return NULL;
    PyObject *result = NULL, *out = NULL, *results = NULL;
    Column *cols = NULL;
    int width = 0;
    PyObject *fast = PySequence_Fast(spec, "columns must be a sequence");
    if (fast == NULL)
        goto cleanup;
    width = (int)PySequence_Fast_GET_SIZE(fast);
    if (width < 1) {
        PyErr_SetString(PyExc_ValueError, "copy_block needs at least one column");
        goto cleanup;
    }
    const unsigned char *bytes = data.buf;
    size_t len = (size_t)data.len;
    if (len && bytes[len - 1] != '\n') {
        PyErr_SetString(PyExc_ValueError, "the COPY block must end with a complete row");
        goto cleanup;
    }
    size_t nrows = 0;
    for (const unsigned char *s = bytes, *e = bytes + len; (s = memchr(s, '\n', (size_t)(e - s))) != NULL; s++)
        nrows++;
    cols = PyMem_Calloc((size_t)width, sizeof(Column));
    if (cols == NULL) {
        PyErr_NoMemory();
        goto cleanup;
    }
    size_t grow = 1;  /* bytes an output row may have beyond its input row */
    for (int c = 0; c < width; c++) {
        PyObject *entry = PySequence_Fast_GET_ITEM(fast, c), *keyed, *callback, *check = Py_None;
        Column *col = &cols[c];
        if (!PyArg_ParseTuple(entry, "iOiis#pOy#|O", &col->action, &keyed, &col->alphabet, &col->length, &col->prefix,
                              &col->prefix_len, &col->collect, &callback, &col->program, &col->program_len, &check))
            goto cleanup;
        if (check != Py_None) {
            int check_alphabet;
            if (!PyArg_ParseTuple(check, "iiy#", &check_alphabet, &col->check_length, &col->check_prefix,
                                  &col->check_prefix_len))
                goto cleanup;
            if (check_alphabet < 0 || check_alphabet > 3 || col->check_length < 1 || col->check_length > 77) {
                PyErr_SetString(PyExc_ValueError, "a check's alphabet must be 0-3 and its length 1-77");
                goto cleanup;
            }
            const char *symbols = check_alphabet == ALPHA_HEX ? HEX : check_alphabet == ALPHA_BASE32 ? B32 :
                                  check_alphabet == ALPHA_BASE64URL ? B64 : "0123456789";
            for (const char *s = symbols; *s; s++) col->symbols[(unsigned char)*s] = 1;
            col->check = 1;
        }
        if (callback != Py_None && !PyCallable_Check(callback)) {
            PyErr_SetString(PyExc_TypeError, "a column's callback must be callable or None");
            goto cleanup;
        }
        col->callback = callback == Py_None ? NULL : callback;
        for (Py_ssize_t k = 0; k < col->program_len; k++) {  /* check the program once, not per value */
            unsigned char op = col->program[k];
            if (op == 'r' && k + 1 < col->program_len && k + 1 + col->program[k + 1] < col->program_len) {
                k += 1 + col->program[k + 1];
            } else if (op != 's' && op != 'l' && op != 'u' && op != 'w') {
                PyErr_SetString(PyExc_ValueError, "a normaliser program holds only s, l, u, w and r<n><chars>");
                goto cleanup;
            }
        }
        if (col->action < ACT_KEEP || col->action > ACT_PSEUDONYMISE) {
            PyErr_SetString(PyExc_ValueError, "column action must be 0 (keep), 1 (drop) or 2 (pseudonymise)");
            goto cleanup;
        }
        if (col->action != ACT_PSEUDONYMISE)
            continue;
        if (keyed != Py_None && !PyObject_TypeCheck(keyed, &KeyedType)) {
            PyErr_SetString(PyExc_TypeError, "a pseudonymised column needs a Keyed or None (randomised)");
            goto cleanup;
        }
        if (col->alphabet < 0 || col->alphabet > 3 || col->length < 1 || col->length > 77) {
            PyErr_SetString(PyExc_ValueError, "alphabet must be 0-3 and length 1-77");
            goto cleanup;
        }
        col->keyed = keyed == Py_None ? NULL : (KeyedObject *)keyed;
        col->macs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(32 * nrows));
        if (col->macs == NULL)
            goto cleanup;
        if (col->collect) {
            uint64_t zero = 0;
            if (buf_put(&col->offsets, &zero, sizeof zero) < 0) {
                PyErr_NoMemory();
                goto cleanup;
            }
        }
        grow += (size_t)col->prefix_len + (size_t)col->length + 2;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len + nrows * grow));
    if (out == NULL)
        goto cleanup;
    {
        Failure fail = {NULL, PyExc_ValueError, 0};
        int pyerr = 0, status;
        size_t out_len = 0;
        Py_ssize_t rows = 0;
        PyThreadState *ts = PyEval_SaveThread();
        status = transform(bytes, len, width, cols, (unsigned char *)PyBytes_AS_STRING(out), &out_len, &rows,
                           &fail, &pyerr, &ts);
        PyEval_RestoreThread(ts);
        if (status < 0) {
            if (!pyerr)
                PyErr_Format(fail.exc_type, "%s (row %zd of the block)", fail.message, fail.row + 1);
            goto cleanup;
        }
        if (_PyBytes_Resize(&out, (Py_ssize_t)out_len) < 0)
            goto cleanup;
        results = PyList_New(0);
        if (results == NULL)
            goto cleanup;
        for (int c = 0; c < width; c++) {
            Column *col = &cols[c];
            if (col->action != ACT_PSEUDONYMISE)
                continue;
            if (_PyBytes_Resize(&col->macs, (Py_ssize_t)(32 * col->count)) < 0)
                goto cleanup;
            PyObject *canon = col->collect ? bytes_from_buf(&col->canon) : Py_NewRef(Py_None);
            PyObject *ends = col->collect ? bytes_from_buf(&col->offsets) : Py_NewRef(Py_None);
            PyObject *item = (canon && ends) ? Py_BuildValue("(OnOOn)", col->macs, (Py_ssize_t)col->nulls, canon, ends,
                                                             (Py_ssize_t)col->mismatched)
                                             : NULL;
            Py_XDECREF(canon);
            Py_XDECREF(ends);
            if (item == NULL || PyList_Append(results, item) < 0) {
                Py_XDECREF(item);
                goto cleanup;
            }
            Py_DECREF(item);
        }
        result = Py_BuildValue("(OnO)", out, rows, results);
    }
cleanup:
    if (cols != NULL) {
        for (int c = 0; c < width; c++) {
            Py_XDECREF(cols[c].macs);
            if (cols[c].canon.data) {
                OPENSSL_cleanse(cols[c].canon.data, cols[c].canon.cap);
                free(cols[c].canon.data);
            }
            free(cols[c].offsets.data);
        }
        PyMem_Free(cols);
    }
    Py_XDECREF(out);
    Py_XDECREF(results);
    Py_XDECREF(fast);
    PyBuffer_Release(&data);
    return result;
}

/* --- escrow ---------------------------------------------------------------------------------- */
static inline char *put_hex(char *w, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        *w++ = HEX[p[i] >> 4];
        *w++ = HEX[p[i] & 15];
    }
    return w;
}

/*
 * seal_rows(dek, ad_prefix, plain_prefix, pseudonyms, width, canonicals, ends, row_start, row_middle, row_end
 *           [, ad_suffix[, row_hashes]]) -> bytes
 *
 * Value i (pseudonym = pseudonyms[i*width:(i+1)*width], canonical = canonicals[ends[i]:ends[i+1]]) is
 * sealed as AES-256-GCM(dek, nonce = i as 96-bit big-endian, plaintext = plain_prefix + canonical,
 * associated data = ad_prefix + pseudonym + ad_suffix) -> ciphertext || tag, and written as one COPY text row:
 * row_start pseudonym row_middle \\x<nonce hex> TAB \\x<ciphertext hex> row_end.
 * The pseudonyms must need no COPY escaping (the caller checks). When given, row_hashes (a writable buffer of
 * n * 32 bytes) receives each row's hash in its batch's digest, SHA-256(len(p) || p || nonce || len(c) || c)
 * (lengths 4-byte big-endian, c the ciphertext and tag: escrow.batch_digest), so the worker knows the digest
 * of what it staged without PostgreSQL computing it.
 */
static PyObject *py_seal_rows(PyObject *module, PyObject *args) {
    Py_buffer dek, ad_prefix, plain_prefix, pseudonyms, canonicals, ends, row_start, row_middle, row_end;
    Py_buffer ad_suffix = {0}, row_hashes = {0};
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*y*y*y*ny*y*y*y*y*|y*w*", &dek, &ad_prefix, &plain_prefix, &pseudonyms, &width,
                          &canonicals, &ends, &row_start, &row_middle, &row_end, &ad_suffix, &row_hashes))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    EVP_MD_CTX *md = NULL;
    unsigned char *scratch = NULL;
    const uint64_t *bounds = ends.buf;
    Py_ssize_t n = ends.len / 8 - 1;
    if (dek.len != 32 || width < 0 || ends.len % 8 || n < 0 || pseudonyms.len != n * width ||
        (n >= 0 && bounds[n] != (uint64_t)canonicals.len) || (n > 0 && bounds[0] != 0)) {
        PyErr_SetString(PyExc_ValueError, "seal_rows: a 32-byte key, n pseudonyms of `width` bytes and n+1 ends");
        goto done;
    }
    if (row_hashes.obj != NULL && row_hashes.len != n * 32) {
        PyErr_SetString(PyExc_ValueError, "seal_rows: row_hashes must hold 32 bytes per value");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (bounds[i] > bounds[i + 1]) {
            PyErr_SetString(PyExc_ValueError, "seal_rows: the ends must not decrease");
            goto done;
        }
    size_t fixed = (size_t)(row_start.len + width + row_middle.len + 3 + 24 + 1 + 3 + row_end.len);
    size_t total = (size_t)n * (fixed + 2 * ((size_t)plain_prefix.len + 16)) + 2 * (size_t)canonicals.len;
    size_t longest = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (bounds[i + 1] - bounds[i] > longest) longest = (size_t)(bounds[i + 1] - bounds[i]);
    /* plaintext | associated data | sealed value (plaintext + 16-byte tag), one after the other */
    size_t plain_max = (size_t)plain_prefix.len + longest;
    size_t ad_len = (size_t)ad_prefix.len + (size_t)width + (size_t)ad_suffix.len;
    size_t scratch_len = plain_max + ad_len + plain_max + 16;
    scratch = PyMem_Malloc(scratch_len);
    ctx = EVP_CIPHER_CTX_new();
    md = row_hashes.obj != NULL ? EVP_MD_CTX_new() : NULL;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (scratch == NULL || ctx == NULL || result == NULL || (row_hashes.obj != NULL && md == NULL)) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    int ok = 1;
    char *w = PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    unsigned char *plain = scratch, *ad = scratch + plain_max, *sealed = ad + ad_len;
    memcpy(plain, plain_prefix.buf, (size_t)plain_prefix.len);
    memcpy(ad, ad_prefix.buf, (size_t)ad_prefix.len);
    if (ad_suffix.len)
        memcpy(ad + ad_prefix.len + width, ad_suffix.buf, (size_t)ad_suffix.len);
    ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) == 1 &&
         EVP_EncryptInit_ex(ctx, NULL, NULL, dek.buf, NULL) == 1;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        unsigned char nonce[12] = {0};
        uint64_t counter = (uint64_t)i;
        for (int k = 0; k < 8; k++) nonce[11 - k] = (unsigned char)(counter >> (8 * k));
        const unsigned char *pseudonym = (const unsigned char *)pseudonyms.buf + i * width;
        size_t clen = (size_t)(bounds[i + 1] - bounds[i]);
        size_t plen = (size_t)plain_prefix.len + clen;
        int outl = 0, finl = 0;
        memcpy(plain + plain_prefix.len, (const unsigned char *)canonicals.buf + bounds[i], clen);
        memcpy(ad + ad_prefix.len, pseudonym, (size_t)width);
        ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1 &&
             EVP_EncryptUpdate(ctx, NULL, &outl, ad, (int)ad_len) == 1 &&
             EVP_EncryptUpdate(ctx, sealed, &outl, plain, (int)plen) == 1 &&
             EVP_EncryptFinal_ex(ctx, sealed + outl, &finl) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, sealed + plen) == 1;
        if (ok && md != NULL) {
            unsigned char lengths[8];
            size_t sealed_len = plen + 16;
            for (int k = 0; k < 4; k++) {
                lengths[3 - k] = (unsigned char)((size_t)width >> (8 * k));
                lengths[7 - k] = (unsigned char)(sealed_len >> (8 * k));
            }
            ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(md, lengths, 4) == 1 &&
                 EVP_DigestUpdate(md, pseudonym, (size_t)width) == 1 && EVP_DigestUpdate(md, nonce, 12) == 1 &&
                 EVP_DigestUpdate(md, lengths + 4, 4) == 1 && EVP_DigestUpdate(md, sealed, sealed_len) == 1 &&
                 EVP_DigestFinal_ex(md, (unsigned char *)row_hashes.buf + 32 * i, NULL) == 1;
        }
        if (!ok)
            break;
        memcpy(w, row_start.buf, (size_t)row_start.len);
        w += row_start.len;
        memcpy(w, pseudonym, (size_t)width);
        w += width;
        memcpy(w, row_middle.buf, (size_t)row_middle.len);
        w += row_middle.len;
        memcpy(w, "\\\\x", 3);
        w = put_hex(w + 3, nonce, 12);
        memcpy(w, "\t\\\\x", 4);
        w = put_hex(w + 4, sealed, plen + 16);
        memcpy(w, row_end.buf, (size_t)row_end.len);
        w += row_end.len;
    }
    OPENSSL_cleanse(scratch, scratch_len);
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL's AES-256-GCM or SHA-256 failed while sealing escrow");
        goto done;
    }
    if (_PyBytes_Resize(&result, (Py_ssize_t)(w - PyBytes_AS_STRING(result))) < 0)
        result = NULL;
done:
    EVP_CIPHER_CTX_free(ctx);
    EVP_MD_CTX_free(md);
    PyMem_Free(scratch);
    PyBuffer_Release(&dek);
    PyBuffer_Release(&ad_prefix);
    PyBuffer_Release(&plain_prefix);
    PyBuffer_Release(&pseudonyms);
    PyBuffer_Release(&canonicals);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&row_start);
    PyBuffer_Release(&row_middle);
    PyBuffer_Release(&row_end);
    if (ad_suffix.obj != NULL)
        PyBuffer_Release(&ad_suffix);
    if (row_hashes.obj != NULL)
        PyBuffer_Release(&row_hashes);
    return result;
}

static PyMethodDef module_methods[] = {
    {"copy_block", py_copy_block, METH_VARARGS, "Pseudonymise a block of COPY text rows (see the source)."},
    {"seal_rows", py_seal_rows, METH_VARARGS, "Escrow rows in COPY text, every value sealed with AES-256-GCM."},
    {"encode", py_encode, METH_VARARGS, "encode(macs, alphabet, length): pseudonym characters, `length` per MAC."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "pseudonymise.core._native", "The pseudonym engine's hot loop in C.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&KeyedType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Keyed", (PyObject *)&KeyedType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "HEX", ALPHA_HEX);
    PyModule_AddIntConstant(m, "BASE32", ALPHA_BASE32);
    PyModule_AddIntConstant(m, "BASE64URL", ALPHA_BASE64URL);
    PyModule_AddIntConstant(m, "DIGITS", ALPHA_DIGITS);
    return m;
}
