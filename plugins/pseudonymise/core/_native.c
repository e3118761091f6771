/*
 * The pseudonym engine's hot loop in C (docs/design.md §4), optional: every function here has a
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
 * arrow_column(...)   one Arrow array (string, large_string, binary, integers, date32, bool) read straight
 *                     from its buffers (validity bitmap, offsets, data; the array's offset respected), each
 *                     value canonical as canonical.py makes it and pseudonymised as in copy_block; out come
 *                     the buffers of a new string array. No Python object per value.
 *
 * recent_known(...), recent_remember(...)
 *                     the collision check's table of recent MACs (collisions.RecentMacs), looked up and
 *                     written in one pass.
 * seen_known(...), seen_add(...)
 *                     the run's exact set of MACs handed to escrow (macsets.MacSet), open addressing.
 * collision_add(...), collision_place(...)
 *                     the collision check's records held in memory (collisions.CollisionGuard), indexed by their
 *                     64-bit key with open addressing: repeats left out, records sharing a key paired for the
 *                     exact comparison, no sorting.
 *
 * seal_rows(...)      escrow rows for PostgreSQL's COPY: every value sealed with AES-256-GCM under the
 *                     batch's data key (counter nonces, associated data project NUL pseudonym),
 *                     as sealer.BatchSealer does with the cryptography package. Only native.py imports
 *                     this module (typed by _native.pyi).
 *
 * ValueFunction(...)  one pseudonymised column as a callable taking one value at a time (None, int, str,
 *                     bytes), for SQLite's create_function: the same canonical bytes, MAC and encoding; each
 *                     MAC handed to the run's collision check in blocks; sqlite_register(...) makes it SQLite's
 *                     own function on a Python sqlite3 connection, called with no Python object per value.
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

/* What one pseudonymised value needs beside its column: scratch room for normalising, the random pool. */
typedef struct {
    Buf normal;
    Random rnd;
} ValueScratch;

static void value_scratch_free(ValueScratch *s) {
    free(s->normal.data);
    OPENSSL_cleanse(&s->rnd, sizeof s->rnd);
}

/*
 * One value (its bytes, unescaped) through a pseudonymised column, shared by copy_block and arrow_column:
 * the format check, the normalisers (ASCII program, or the callback for non-ASCII text), the MAC (keyed,
 * or random), the pseudonym written at `w` (prefix then `length` symbols), the canonical bytes collected.
 * Runs without the GIL; takes it back only for the callback. Returns 0, or -1 with `fail` filled in (or a
 * Python exception set when `*pyerr`).
 */
static int pseudonymise_value(Column *col, const unsigned char *value, size_t vlen, unsigned char *w,
                              ValueScratch *s, Failure *fail, int *pyerr, PyThreadState **ts) {
    PyObject *normal = NULL;
    int status = -1;
    if (col->check && !matches_format(col, value, vlen))
        col->mismatched++;
    int ascii = 1;
    if (col->program_len || col->callback != NULL) /* secondary and non-text columns use neither */
        for (size_t i = 0; i < vlen; i++)
            if (value[i] & 0x80) { ascii = 0; break; }
    if (ascii && col->program_len) {
        if (buf_reserve(&s->normal, vlen + 1) < 0) {
            fail->message = "out of memory";
            return -1;
        }
        memcpy(s->normal.data, value, vlen);
        vlen = ascii_normalise(col->program, (size_t)col->program_len, s->normal.data, vlen);
        value = s->normal.data;
    }
    if (col->callback != NULL && !ascii) {
        PyEval_RestoreThread(*ts);
        normal = call_callback(col->callback, value, vlen);
        *ts = PyEval_SaveThread();
        if (normal == NULL) {
            *pyerr = 1;
            return -1;
        }
        value = (const unsigned char *)PyBytes_AS_STRING(normal);
        vlen = (size_t)PyBytes_GET_SIZE(normal);
    }
    unsigned char *mac = (unsigned char *)PyBytes_AS_STRING(col->macs) + 32 * col->count;
    if (col->keyed != NULL) {
        keyed_mac(col->keyed, value, vlen, mac);
    } else if (random_mac(&s->rnd, mac) < 0) {
        fail->message = "the operating system's random generator failed";
        fail->exc_type = PyExc_OSError;
        goto done;
    }
    col->count++;
    memcpy(w, col->prefix, (size_t)col->prefix_len);
    encode_mac(mac, col->alphabet, col->length, (char *)w + col->prefix_len);
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
    status = 0;
done:
    if (normal != NULL) {
        PyEval_RestoreThread(*ts);
        Py_DECREF(normal);
        *ts = PyEval_SaveThread();
    }
    return status;
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
    Buf scratch = {0};
    ValueScratch values = {{0}, {.left = 0}};
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
                    if (memchr(p, '\\', flen) != NULL) {
                        if (buf_reserve(&scratch, flen) < 0) {
                            fail->message = "out of memory";
                            goto done;
                        }
                        vlen = unescape(p, flen, scratch.data);
                        value = scratch.data;
                    }
                    if (pseudonymise_value(col, value, vlen, w, &values, fail, pyerr, ts) < 0) {
                        fail->row = rows;
                        goto done;
                    }
                    w += col->prefix_len + col->length;
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
    value_scratch_free(&values);
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
 * One column entry, (action, keyed or None, alphabet, length, prefix, collect, callback, program[, check]),
 * into `col`, checked; a pseudonymised column gets room for `nrows` MACs. Returns 0, or -1 with an exception set.
 */
static int parse_column(PyObject *entry, Column *col, size_t nrows) {
    PyObject *keyed, *callback, *check = Py_None;
    if (!PyArg_ParseTuple(entry, "iOiis#pOy#|O", &col->action, &keyed, &col->alphabet, &col->length, &col->prefix,
                          &col->prefix_len, &col->collect, &callback, &col->program, &col->program_len, &check))
        return -1;
    if (check != Py_None) {
        int check_alphabet;
        if (!PyArg_ParseTuple(check, "iiy#", &check_alphabet, &col->check_length, &col->check_prefix,
                              &col->check_prefix_len))
            return -1;
        if (check_alphabet < 0 || check_alphabet > 3 || col->check_length < 1 || col->check_length > 77) {
            PyErr_SetString(PyExc_ValueError, "a check's alphabet must be 0-3 and its length 1-77");
            return -1;
        }
        const char *symbols = check_alphabet == ALPHA_HEX ? HEX : check_alphabet == ALPHA_BASE32 ? B32 :
                              check_alphabet == ALPHA_BASE64URL ? B64 : "0123456789";
        for (const char *s = symbols; *s; s++) col->symbols[(unsigned char)*s] = 1;
        col->check = 1;
    }
    if (callback != Py_None && !PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "a column's callback must be callable or None");
        return -1;
    }
    col->callback = callback == Py_None ? NULL : callback;
    for (Py_ssize_t k = 0; k < col->program_len; k++) {  /* check the program once, not per value */
        unsigned char op = col->program[k];
        if (op == 'r' && k + 1 < col->program_len && k + 1 + col->program[k + 1] < col->program_len) {
            k += 1 + col->program[k + 1];
        } else if (op != 's' && op != 'l' && op != 'u' && op != 'w') {
            PyErr_SetString(PyExc_ValueError, "a normaliser program holds only s, l, u, w and r<n><chars>");
            return -1;
        }
    }
    if (col->action < ACT_KEEP || col->action > ACT_PSEUDONYMISE) {
        PyErr_SetString(PyExc_ValueError, "column action must be 0 (keep), 1 (drop) or 2 (pseudonymise)");
        return -1;
    }
    if (col->action != ACT_PSEUDONYMISE)
        return 0;
    if (keyed != Py_None && !PyObject_TypeCheck(keyed, &KeyedType)) {
        PyErr_SetString(PyExc_TypeError, "a pseudonymised column needs a Keyed or None (randomised)");
        return -1;
    }
    if (col->alphabet < 0 || col->alphabet > 3 || col->length < 1 || col->length > 77) {
        PyErr_SetString(PyExc_ValueError, "alphabet must be 0-3 and length 1-77");
        return -1;
    }
    col->keyed = keyed == Py_None ? NULL : (KeyedObject *)keyed;
    col->macs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(32 * nrows));
    if (col->macs == NULL)
        return -1;
    if (col->collect) {
        uint64_t zero = 0;
        if (buf_put(&col->offsets, &zero, sizeof zero) < 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

/* A pseudonymised column's result tuple (macs, nulls, canonicals or None, ends or None, mismatched); NULL on error. */
static PyObject *column_result(Column *col) {
    if (_PyBytes_Resize(&col->macs, (Py_ssize_t)(32 * col->count)) < 0)
        return NULL;
    PyObject *canon = col->collect ? bytes_from_buf(&col->canon) : Py_NewRef(Py_None);
    PyObject *ends = col->collect ? bytes_from_buf(&col->offsets) : Py_NewRef(Py_None);
    PyObject *item = (canon && ends) ? Py_BuildValue("(OnOOn)", col->macs, (Py_ssize_t)col->nulls, canon, ends,
                                                     (Py_ssize_t)col->mismatched)
                                     : NULL;
    Py_XDECREF(canon);
    Py_XDECREF(ends);
    return item;
}

/* What a column holds: its MACs, and its canonical bytes wiped before they are freed. */
static void column_free(Column *col) {
    Py_XDECREF(col->macs);
    col->macs = NULL;
    if (col->canon.data) {
        OPENSSL_cleanse(col->canon.data, col->canon.cap);
        free(col->canon.data);
    }
    free(col->offsets.data);
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
        if (parse_column(PySequence_Fast_GET_ITEM(fast, c), &cols[c], nrows) < 0)
            goto cleanup;
        if (cols[c].action == ACT_PSEUDONYMISE)
            grow += (size_t)cols[c].prefix_len + (size_t)cols[c].length + 2;
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
            PyObject *item = column_result(col);
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
        for (int c = 0; c < width; c++)
            column_free(&cols[c]);
        PyMem_Free(cols);
    }
    Py_XDECREF(out);
    Py_XDECREF(results);
    Py_XDECREF(fast);
    PyBuffer_Release(&data);
    return result;
}

/* --- Arrow arrays ------------------------------------------------------------------------------ */
/* The Arrow layouts arrow_column reads (native.py's ARROW_KINDS names them). */
enum {
    KIND_UTF8 = 0, KIND_LARGE_UTF8 = 1, KIND_BINARY = 2, KIND_LARGE_BINARY = 3,
    KIND_INT8 = 4, KIND_INT16 = 5, KIND_INT32 = 6, KIND_INT64 = 7,
    KIND_UINT8 = 8, KIND_UINT16 = 9, KIND_UINT32 = 10, KIND_UINT64 = 11,
    KIND_DATE32 = 12, KIND_BOOL = 13, KIND_COUNT = 14
};
/* Bytes per value of the fixed-width kinds (0: variable width or bit-packed). */
static const int KIND_WIDTH[KIND_COUNT] = {0, 0, 0, 0, 1, 2, 4, 8, 1, 2, 4, 8, 4, 0};

static inline int bit_at(const unsigned char *bits, size_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

/* The decimal digits of an integer, `-` first when negative (canonical.py: str(int)); returns the length. */
static size_t format_int(int negative, uint64_t magnitude, char *out) {
    char digits[24];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    size_t len = 0;
    if (negative)
        out[len++] = '-';
    while (n) out[len++] = digits[--n];
    return len;
}

/* Days since 1970-01-01 as ISO 8601 YYYY-MM-DD (datetime.date.isoformat), proleptic Gregorian; -1 outside
 * the years 1 to 9999 (Python's dates). The civil-from-days algorithm of H. Hinnant. */
static int format_date(int32_t days, char *out) {
    int64_t z = (int64_t)days + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1;
    int64_t month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    if (year < 1 || year > 9999)
        return -1;
    out[0] = (char)('0' + year / 1000);
    out[1] = (char)('0' + year / 100 % 10);
    out[2] = (char)('0' + year / 10 % 10);
    out[3] = (char)('0' + year % 10);
    out[4] = '-';
    out[5] = (char)('0' + month / 10);
    out[6] = (char)('0' + month % 10);
    out[7] = '-';
    out[8] = (char)('0' + day / 10);
    out[9] = (char)('0' + day % 10);
    return 10;
}

typedef struct {
    int kind;
    size_t length, offset;            /* values, and the first one's position in the buffers */
    const unsigned char *validity;    /* NULL: no NULLs */
    const unsigned char *offsets;     /* variable-width kinds: int32 or int64 offsets */
    const unsigned char *data;
    size_t data_len;
} ArrowIn;

/*
 * The canonical bytes of value `i` of a non-text kind, or of a string's bytes, into (*value, *vlen); `text`
 * is room for the decimal and date forms. Returns 0, or -1 with `fail` filled in.
 */
static int arrow_value(const ArrowIn *in, size_t i, char *text, const unsigned char **value, size_t *vlen,
                       Failure *fail) {
    size_t j = in->offset + i;
    const unsigned char *d = in->data;
    int64_t s = 0;
    uint64_t u = 0;
    switch (in->kind) {
    case KIND_UTF8:
    case KIND_BINARY:
    case KIND_LARGE_UTF8:
    case KIND_LARGE_BINARY: {
        int64_t start, stop;
        if (in->kind == KIND_UTF8 || in->kind == KIND_BINARY) {
            int32_t a, b;
            memcpy(&a, in->offsets + 4 * j, 4);
            memcpy(&b, in->offsets + 4 * (j + 1), 4);
            start = a;
            stop = b;
        } else {
            memcpy(&start, in->offsets + 8 * j, 8);
            memcpy(&stop, in->offsets + 8 * (j + 1), 8);
        }
        if (start < 0 || stop < start || (uint64_t)stop > in->data_len) {
            fail->message = "the Arrow array's offsets point outside its data";
            return -1;
        }
        *value = d != NULL ? d + start : (const unsigned char *)"";  /* no data buffer: every value is empty */
        *vlen = (size_t)(stop - start);
        return 0;
    }
    case KIND_BOOL:
        *value = (const unsigned char *)(bit_at(d, j) ? "true" : "false");
        *vlen = bit_at(d, j) ? 4 : 5;
        return 0;
    case KIND_DATE32: {
        int32_t days;
        memcpy(&days, d + 4 * j, 4);
        int n = format_date(days, text);
        if (n < 0) {
            fail->message = "a date outside the years 1 to 9999, which Python's dates (and so the canonical form) "
                            "cannot hold";
            return -1;
        }
        *value = (const unsigned char *)text;
        *vlen = (size_t)n;
        return 0;
    }
    case KIND_INT8: { int8_t v; memcpy(&v, d + j, 1); s = v; break; }
    case KIND_INT16: { int16_t v; memcpy(&v, d + 2 * j, 2); s = v; break; }
    case KIND_INT32: { int32_t v; memcpy(&v, d + 4 * j, 4); s = v; break; }
    case KIND_INT64: { memcpy(&s, d + 8 * j, 8); break; }
    case KIND_UINT8: { uint8_t v; memcpy(&v, d + j, 1); u = v; break; }
    case KIND_UINT16: { uint16_t v; memcpy(&v, d + 2 * j, 2); u = v; break; }
    case KIND_UINT32: { uint32_t v; memcpy(&v, d + 4 * j, 4); u = v; break; }
    default: { memcpy(&u, d + 8 * j, 8); break; }
    }
    int negative = in->kind <= KIND_INT64 && s < 0;
    if (in->kind <= KIND_INT64)
        u = negative ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
    *value = (const unsigned char *)text;
    *vlen = format_int(negative, u, text);
    return 0;
}

/* The loop over an Arrow array (no GIL but for the column's callback); the output string array's offsets
 * and data are written into `offsets_out` and `data_out`, its validity into `validity_out` when there is one. */
static int arrow_transform(const ArrowIn *in, Column *col, int32_t *offsets_out, unsigned char *data_out,
                           unsigned char *validity_out, Failure *fail, int *pyerr, PyThreadState **ts) {
    ValueScratch scratch = {{0}, {.left = 0}};
    char text[32];
    const size_t width = (size_t)col->prefix_len + (size_t)col->length;
    size_t pos = 0;
    int status = -1;
    offsets_out[0] = 0;
    for (size_t i = 0; i < in->length; i++) {
        if (in->validity != NULL && !bit_at(in->validity, in->offset + i)) {
            col->nulls++;
        } else {
            const unsigned char *value;
            size_t vlen;
            if (validity_out != NULL)
                validity_out[i >> 3] |= (unsigned char)(1u << (i & 7));
            if (arrow_value(in, i, text, &value, &vlen, fail) < 0 ||
                pseudonymise_value(col, value, vlen, data_out + pos, &scratch, fail, pyerr, ts) < 0) {
                fail->row = (Py_ssize_t)i;
                goto done;
            }
            pos += width;
        }
        offsets_out[i + 1] = (int32_t)pos;
    }
    status = 0;
done:
    value_scratch_free(&scratch);
    return status;
}

/* Whether `buf` (a buffer of the array, or None) holds at least `need` bytes; sets ValueError if not. */
static int arrow_buffer(PyObject *obj, Py_buffer *view, size_t need, const char *what) {
    if (obj == Py_None) {
        if (need == 0)
            return 0;
        PyErr_Format(PyExc_ValueError, "the Arrow array has no %s buffer", what);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if ((size_t)view->len < need) {
        PyErr_Format(PyExc_ValueError, "the Arrow array's %s buffer is shorter than its length says", what);
        return -1;
    }
    return 0;
}

/*
 * arrow_column(column, kind, length, offset, validity, offsets, data) -> (validity, offsets, data, result)
 *
 * One Arrow array of `kind` (KIND_*), `length` values from position `offset` of its buffers (validity bitmap
 * or None when it has no NULLs, offsets or None for fixed-width kinds, data), pseudonymised as `column` (an
 * entry as copy_block takes, its prefix in UTF-8; the callback and program apply to text kinds only).
 * Returns the new string array's buffers, validity None without NULLs (int32 offsets, the pseudonyms'
 * UTF-8 one after the other), and the column's result tuple as copy_block gives it.
 */
static PyObject *py_arrow_column(PyObject *module, PyObject *args) {
    PyObject *entry, *validity_obj, *offsets_obj, *data_obj;
    int kind;
    Py_ssize_t length, offset;
    if (!PyArg_ParseTuple(args, "OinnOOO", &entry, &kind, &length, &offset, &validity_obj, &offsets_obj, &data_obj))
        return NULL;
    Py_buffer validity = {0}, offsets = {0}, data = {0};
    Column col;
    memset(&col, 0, sizeof col);
    PyObject *result = NULL, *validity_out = NULL, *offsets_out = NULL, *data_out = NULL, *item = NULL;
    if (kind < 0 || kind >= KIND_COUNT || length < 0 || offset < 0) {
        PyErr_SetString(PyExc_ValueError, "arrow_column: an unknown kind, or a negative length or offset");
        return NULL;
    }
    size_t n = (size_t)length, end = (size_t)offset + n;
    int variable = kind <= KIND_LARGE_BINARY, text = kind == KIND_UTF8 || kind == KIND_LARGE_UTF8;
    size_t offset_width = kind == KIND_UTF8 || kind == KIND_BINARY ? 4 : 8;
    size_t data_need = kind == KIND_BOOL ? (end + 7) / 8 : (size_t)KIND_WIDTH[kind] * end;
    if (arrow_buffer(validity_obj, &validity, validity_obj == Py_None ? 0 : (end + 7) / 8, "validity") < 0 ||
        arrow_buffer(offsets_obj, &offsets, variable ? offset_width * (end + 1) : 0, "offsets") < 0 ||
        arrow_buffer(data_obj, &data, variable ? 0 : data_need, "data") < 0)
        goto cleanup;
    if (parse_column(entry, &col, n) < 0)
        goto cleanup;
    if (col.action != ACT_PSEUDONYMISE) {
        PyErr_SetString(PyExc_ValueError, "arrow_column takes a pseudonymised column");
        goto cleanup;
    }
    if (!text) {  /* normalisers and NFC are for text; other values are canonical as they are written */
        col.callback = NULL;
        col.program_len = 0;
    }
    size_t width = (size_t)col.prefix_len + (size_t)col.length;
    if (n && width * n > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the batch's pseudonyms would pass 2 GiB; use a smaller batch size");
        goto cleanup;
    }
    data_out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(width * n));
    offsets_out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 * (n + 1)));
    if (validity_obj != Py_None) {
        validity_out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((n + 7) / 8));
        if (validity_out != NULL)
            memset(PyBytes_AS_STRING(validity_out), 0, (n + 7) / 8);
    }
    if (data_out == NULL || offsets_out == NULL || (validity_obj != Py_None && validity_out == NULL))
        goto cleanup;
    {
        ArrowIn in = {kind, n, (size_t)offset, validity.buf, offsets.buf, data.buf, data.buf ? (size_t)data.len : 0};
        Failure fail = {NULL, PyExc_ValueError, 0};
        int pyerr = 0;
        PyThreadState *ts = PyEval_SaveThread();
        int status = arrow_transform(&in, &col, (int32_t *)PyBytes_AS_STRING(offsets_out),
                                     (unsigned char *)PyBytes_AS_STRING(data_out),
                                     validity_out ? (unsigned char *)PyBytes_AS_STRING(validity_out) : NULL,
                                     &fail, &pyerr, &ts);
        PyEval_RestoreThread(ts);
        if (status < 0) {
            if (!pyerr)
                PyErr_Format(fail.exc_type, "%s (value %zd of the array)", fail.message, fail.row + 1);
            goto cleanup;
        }
    }
    if (_PyBytes_Resize(&data_out, (Py_ssize_t)(width * col.count)) < 0)
        goto cleanup;
    if (col.nulls == 0)
        Py_CLEAR(validity_out);
    item = column_result(&col);
    if (item != NULL)
        result = Py_BuildValue("(OOOO)", validity_out ? validity_out : Py_None, offsets_out, data_out, item);
cleanup:
    column_free(&col);
    Py_XDECREF(item);
    Py_XDECREF(validity_out);
    Py_XDECREF(offsets_out);
    Py_XDECREF(data_out);
    if (validity.obj != NULL)
        PyBuffer_Release(&validity);
    if (offsets.obj != NULL)
        PyBuffer_Release(&offsets);
    if (data.obj != NULL)
        PyBuffer_Release(&data);
    return result;
}

/* --- the table of recent MACs (collisions.RecentMacs is the definition) ------------------------- */
/* The table's slot of a MAC: its first 8 bytes as a native-endian uint64, masked (numpy's words[:, 0] & mask). */
static inline size_t recent_slot(const unsigned char *mac, size_t mask) {
    uint64_t first;
    memcpy(&first, mac, 8);
    return (size_t)(first & mask);
}

/* How many MACs ahead the loops below ask for their slot, so that several cache misses are under way at once. */
#define RECENT_AHEAD 8
static inline void recent_prefetch(const unsigned char *held, const unsigned char *in_use, const unsigned char *mac,
                                   size_t mask) {
#if defined(__GNUC__) || defined(__clang__)
    size_t slot = recent_slot(mac, mask);
    __builtin_prefetch(held + 32 * slot);
    __builtin_prefetch(in_use + slot);
#else
    (void)held; (void)in_use; (void)mac; (void)mask;
#endif
}

static int recent_args(PyObject *args, Py_buffer *table, Py_buffer *used, Py_buffer *macs, int writable) {
    if (!PyArg_ParseTuple(args, writable ? "w*w*y*" : "y*y*y*", table, used, macs))
        return -1;
    size_t slots = (size_t)used->len;
    if (slots == 0 || (slots & (slots - 1)) || (size_t)table->len != 32 * slots || macs->len % 32) {
        PyErr_SetString(PyExc_ValueError, "a table of 32 bytes per slot, a power-of-two number of slots, whole MACs");
        PyBuffer_Release(table);
        PyBuffer_Release(used);
        PyBuffer_Release(macs);
        return -1;
    }
    return 0;
}

/* recent_remember(table, used, macs): every MAC into its slot, in order (a later one takes the slot). */
static PyObject *py_recent_remember(PyObject *module, PyObject *args) {
    Py_buffer table, used, macs;
    if (recent_args(args, &table, &used, &macs, 1) < 0)
        return NULL;
    size_t n = (size_t)macs.len / 32, mask = (size_t)used.len - 1;
    unsigned char *held = table.buf, *in_use = used.buf;
    const unsigned char *m = macs.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) {
        if (i + RECENT_AHEAD < n)
            recent_prefetch(held, in_use, m + 32 * (i + RECENT_AHEAD), mask);
        size_t slot = recent_slot(m + 32 * i, mask);
        memcpy(held + 32 * slot, m + 32 * i, 32);
        in_use[slot] = 1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&table);
    PyBuffer_Release(&used);
    PyBuffer_Release(&macs);
    Py_RETURN_NONE;
}

/* --- the run's exact set of sealed MACs (macsets.MacSet is the definition) -------------- */
/* Open addressing with linear probing: 32 bytes per slot, a power-of-two number of slots, ``used`` one byte per
 * slot; a MAC starts probing at its first 8 bytes (native-endian) masked, like the table of recent MACs. Whole
 * MACs are compared. The caller keeps the table at most half full (it grows it), so a probe always ends. */
static inline int seen_find(const unsigned char *held, const unsigned char *in_use, size_t mask,
                            const unsigned char *mac, size_t *slot) {
    size_t s = recent_slot(mac, mask);
    while (in_use[s]) {
        if (memcmp(held + 32 * s, mac, 32) == 0) {
            *slot = s;
            return in_use[s];  /* 1, or 2 for a slot seen_add filled in its current call */
        }
        s = (s + 1) & mask;
    }
    *slot = s;
    return 0;
}

/* The flags of the two look-ups below: for each MAC of `macs`, 1 if the table holds it, else 0. `set` chooses
 * the table: 0 the direct-mapped table of recent MACs (one slot per MAC, later slots prefetched), 1 the
 * open-addressing set of seen_add. */
static PyObject *mac_flags(PyObject *args, int set) {
    Py_buffer table, used, macs;
    if (recent_args(args, &table, &used, &macs, 0) < 0)
        return NULL;
    size_t n = (size_t)macs.len / 32, mask = (size_t)used.len - 1, slot;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out != NULL) {
        unsigned char *flags = (unsigned char *)PyBytes_AS_STRING(out);
        const unsigned char *held = table.buf, *in_use = used.buf, *m = macs.buf;
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++) {
            if (i + RECENT_AHEAD < n)  /* the table is far larger than the caches: ask for a later slot now */
                recent_prefetch(held, in_use, m + 32 * (i + RECENT_AHEAD), mask);
            if (set) {
                flags[i] = seen_find(held, in_use, mask, m + 32 * i, &slot) != 0;
                continue;
            }
            slot = recent_slot(m + 32 * i, mask);
            flags[i] = in_use[slot] && memcmp(held + 32 * slot, m + 32 * i, 32) == 0;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&used);
    PyBuffer_Release(&macs);
    return out;
}

/* recent_unseen(table, used, macs) -> bytes: for each MAC in order, 1 where its slot did not hold it (it then takes
 * the slot), else 0: recent_known and recent_remember in one pass over the table, except that a MAC repeated within
 * `macs` is held from its second place on (its first put it in its slot). collisions.RecentMacs.unseen has the
 * definition in numpy. */
static PyObject *py_recent_unseen(PyObject *module, PyObject *args) {
    Py_buffer table, used, macs;
    if (recent_args(args, &table, &used, &macs, 1) < 0)
        return NULL;
    size_t n = (size_t)macs.len / 32, mask = (size_t)used.len - 1;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out != NULL) {
        unsigned char *flags = (unsigned char *)PyBytes_AS_STRING(out), *held = table.buf, *in_use = used.buf;
        const unsigned char *m = macs.buf;
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++) {
            if (i + RECENT_AHEAD < n)
                recent_prefetch(held, in_use, m + 32 * (i + RECENT_AHEAD), mask);
            size_t slot = recent_slot(m + 32 * i, mask);
            if (in_use[slot] && memcmp(held + 32 * slot, m + 32 * i, 32) == 0) {
                flags[i] = 0;
                continue;
            }
            memcpy(held + 32 * slot, m + 32 * i, 32);
            in_use[slot] = 1;
            flags[i] = 1;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&used);
    PyBuffer_Release(&macs);
    return out;
}

/* recent_known(table, used, macs) -> bytes: 1 where the MAC is the one held in its slot, else 0. */
static PyObject *py_recent_known(PyObject *module, PyObject *args) { return mac_flags(args, 0); }

/* seen_known(table, used, macs) -> bytes: 1 where the MAC is in the set, else 0. */
static PyObject *py_seen_known(PyObject *module, PyObject *args) { return mac_flags(args, 1); }

/* seen_add(table, used, macs, room) -> (added, flags): the MACs not in the set go in, in order, until `room` of them
 * were added. flags has, for each MAC: 0 if the set held it before this call; 1 if it did not and the MAC is in it now
 * (added here, or a repeat of one added here); 2 if it did not and the MAC found no room (left out). One pass over
 * the table, a later MAC's slot asked for ahead; a slot filled in this call is marked 2 in `used` until the end. */
static PyObject *py_seen_add(PyObject *module, PyObject *args) {
    Py_buffer table, used, macs;
    Py_ssize_t room;
    if (!PyArg_ParseTuple(args, "w*w*y*n", &table, &used, &macs, &room))
        return NULL;
    size_t slots = (size_t)used.len;
    if (slots == 0 || (slots & (slots - 1)) || (size_t)table.len != 32 * slots || macs.len % 32 || room < 0
        || (size_t)room > slots / 2) {
        PyErr_SetString(PyExc_ValueError, "a table of 32 bytes per slot, a power-of-two number of slots, whole MACs, "
                                          "room for at most half the slots");
        PyBuffer_Release(&table);
        PyBuffer_Release(&used);
        PyBuffer_Release(&macs);
        return NULL;
    }
    size_t n = (size_t)macs.len / 32, mask = slots - 1, slot, added = 0, left = (size_t)room;
    size_t *filled = PyMem_RawMalloc(sizeof(size_t) * (left < n ? left : n) + 1);
    PyObject *out = filled == NULL ? PyErr_NoMemory() : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out != NULL) {
        unsigned char *flags = (unsigned char *)PyBytes_AS_STRING(out), *held = table.buf, *in_use = used.buf;
        const unsigned char *m = macs.buf;
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++) {
            if (i + RECENT_AHEAD < n)
                recent_prefetch(held, in_use, m + 32 * (i + RECENT_AHEAD), mask);
            int found = seen_find(held, in_use, mask, m + 32 * i, &slot);
            if (found) {
                flags[i] = (unsigned char)(found == 2);
                continue;
            }
            if (added == left) {
                flags[i] = 2;
                continue;
            }
            memcpy(held + 32 * slot, m + 32 * i, 32);
            in_use[slot] = 2;
            filled[added++] = slot;
            flags[i] = 1;
        }
        for (size_t k = 0; k < added; k++)
            in_use[filled[k]] = 1;
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(filled);
    PyBuffer_Release(&table);
    PyBuffer_Release(&used);
    PyBuffer_Release(&macs);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(nN)", (Py_ssize_t)added, out);
}

/* --- the collision check's records (collisions.CollisionGuard: its sorted numpy records are the definition) --- */
/* A record is collisions.RECORD, packed: the 64-bit key (little-endian; equal pseudonyms share it) at 0, the MAC at 8,
 * the column (uint16) at 40. The table indexes the records held: open addressing with linear probing, 16 bytes a
 * slot (the key, then the record's index + 1; 0 is an empty slot), a power-of-two number of slots kept at most half
 * full by the caller, so a probe always ends and usually touches one slot. */
#define COLLISION_RECORD 42
#define COLLISION_AHEAD 8

static inline uint64_t collision_key(const unsigned char *record) {
    uint64_t key;
    memcpy(&key, record, 8);  /* native-endian: keys are only compared and mixed, so the byte order does not matter */
    return key;
}

/* The first slot of a key: its bits mixed (a key may be a hash with regular low bits), masked. */
static inline size_t collision_slot(uint64_t key, size_t mask) {
    uint64_t h = key * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h ^ (h >> 29)) & mask;
}

static inline void collision_prefetch(const uint64_t *slots, const unsigned char *record, size_t mask) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(slots + 2 * collision_slot(collision_key(record), mask));
#else
    (void)slots; (void)record; (void)mask;
#endif
}

static int collision_table_args(Py_buffer *slots, Py_buffer *records, Py_ssize_t count, size_t more) {
    size_t n = (size_t)slots->len / 16;
    if (slots->len % 16 || n == 0 || (n & (n - 1)) || records->len % COLLISION_RECORD || count < 0
        || (size_t)count + more > (size_t)records->len / COLLISION_RECORD || 2 * ((size_t)count + more) > n
        || (size_t)count + more >= UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a table of 16 bytes per slot, a power-of-two number of slots at most half "
                                          "full, whole records of 42 bytes and room for them");
        return -1;
    }
    return 0;
}

/* collision_place(slots, records, count): index the first `count` records into an empty table (after it grew). */
static PyObject *py_collision_place(PyObject *module, PyObject *args) {
    Py_buffer slots, records;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "w*y*n", &slots, &records, &count))
        return NULL;
    if (collision_table_args(&slots, &records, count, 0) < 0) {
        PyBuffer_Release(&slots);
        PyBuffer_Release(&records);
        return NULL;
    }
    uint64_t *table = slots.buf;
    const unsigned char *held = records.buf;
    size_t mask = (size_t)slots.len / 16 - 1;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < (size_t)count; i++) {
        uint64_t key = collision_key(held + COLLISION_RECORD * i);
        size_t s = collision_slot(key, mask);
        while (table[2 * s + 1])
            s = (s + 1) & mask;
        table[2 * s] = key;
        table[2 * s + 1] = i + 1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&slots);
    PyBuffer_Release(&records);
    Py_RETURN_NONE;
}

/*
 * collision_add(slots, records, count, incoming, randomised, room) -> (count, pairs, done)
 *
 * Each incoming record in turn: every held record with the same key is a pair to compare exactly (the caller encodes
 * both MACs), except that in a deterministic run a held record with the same MAC makes the incoming one a repeat of
 * a value already held, which is left out. Any other record is appended to `records` (at `count`, which grows) and
 * indexed, while `room` records may still be added; the first that finds no room stops the loop. `done` is how many
 * incoming records were dealt with (all of them unless the room ran out); `pairs` holds, for each pair, the held
 * record's index and the incoming record's position (native-endian uint32 each).
 */
static PyObject *py_collision_add(PyObject *module, PyObject *args) {
    Py_buffer slots, records, incoming;
    Py_ssize_t count, room;
    int randomised;
    if (!PyArg_ParseTuple(args, "w*w*ny*pn", &slots, &records, &count, &incoming, &randomised, &room))
        return NULL;
    size_t n = (size_t)incoming.len / COLLISION_RECORD;
    if (incoming.len % COLLISION_RECORD || room < 0
        || collision_table_args(&slots, &records, count, (size_t)room) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "whole records of 42 bytes and a room of 0 or more");
        PyBuffer_Release(&slots);
        PyBuffer_Release(&records);
        PyBuffer_Release(&incoming);
        return NULL;
    }
    uint64_t *table = slots.buf;
    unsigned char *held = records.buf;
    const unsigned char *in = incoming.buf;
    size_t mask = (size_t)slots.len / 16 - 1, held_count = (size_t)count, npairs = 0, cap = 0, done = n;
    size_t full = (size_t)count + (size_t)room;
    uint32_t *pairs = NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n && !failed; i++) {
        if (i + COLLISION_AHEAD < n)
            collision_prefetch(table, in + COLLISION_RECORD * (i + COLLISION_AHEAD), mask);
        const unsigned char *record = in + COLLISION_RECORD * i;
        uint64_t key = collision_key(record);
        size_t s = collision_slot(key, mask);
        int repeat = 0;
        for (; table[2 * s + 1]; s = (s + 1) & mask) {
            if (table[2 * s] != key)
                continue;
            size_t j = (size_t)table[2 * s + 1] - 1;
            if (!randomised && memcmp(held + COLLISION_RECORD * j + 8, record + 8, 32) == 0) {
                repeat = 1;
                break;
            }
            if (npairs == cap) {
                size_t grown = cap ? 2 * cap : 64;
                uint32_t *more = realloc(pairs, grown * 2 * sizeof(uint32_t));
                if (more == NULL) {
                    failed = 1;
                    break;
                }
                pairs = more;
                cap = grown;
            }
            pairs[2 * npairs] = (uint32_t)j;
            pairs[2 * npairs + 1] = (uint32_t)i;
            npairs++;
        }
        if (repeat || failed)
            continue;
        if (held_count == full) {  /* no room: this record and the rest are the caller's (its pairs are dropped) */
            while (npairs && pairs[2 * npairs - 1] == (uint32_t)i)
                npairs--;
            done = i;
            break;
        }
        memcpy(held + COLLISION_RECORD * held_count, record, COLLISION_RECORD);
        table[2 * s] = key;
        table[2 * s + 1] = held_count + 1;
        held_count++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&slots);
    PyBuffer_Release(&records);
    PyBuffer_Release(&incoming);
    if (failed) {
        free(pairs);
        return PyErr_NoMemory();
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)pairs, (Py_ssize_t)(npairs * 2 * sizeof(uint32_t)));
    free(pairs);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(nNn)", (Py_ssize_t)held_count, out, (Py_ssize_t)done);
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
 * With binary true the row is in COPY's binary format instead: row_start pseudonym row_middle <nonce> <4-byte
 * big-endian length of the ciphertext> <ciphertext> row_end (the caller frames the fields and the file).
 * The pseudonyms must need no COPY escaping (the caller checks). When given, row_hashes (a writable buffer of
 * n * 32 bytes) receives each row's hash in its batch's digest, SHA-256(len(p) || p || nonce || len(c) || c)
 * (lengths 4-byte big-endian, c the ciphertext and tag: escrow.batch_digest), so the worker knows the digest
 * of what it staged without PostgreSQL computing it.
 */
static PyObject *py_seal_rows(PyObject *module, PyObject *args) {
    Py_buffer dek, ad_prefix, plain_prefix, pseudonyms, canonicals, ends, row_start, row_middle, row_end;
    Py_buffer ad_suffix = {0}, row_hashes = {0};
    Py_ssize_t width;
    int binary = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*y*ny*y*y*y*y*|y*w*p", &dek, &ad_prefix, &plain_prefix, &pseudonyms, &width,
                          &canonicals, &ends, &row_start, &row_middle, &row_end, &ad_suffix, &row_hashes, &binary))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
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
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (scratch == NULL || ctx == NULL || result == NULL) {
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
        if (ok && row_hashes.obj != NULL) {
            unsigned char lengths[8];
            size_t sealed_len = plen + 16;
            for (int k = 0; k < 4; k++) {
                lengths[3 - k] = (unsigned char)((size_t)width >> (8 * k));
                lengths[7 - k] = (unsigned char)(sealed_len >> (8 * k));
            }
            /* SHA-256 as the HMAC above computes it: EVP_DigestInit_ex would look the algorithm up again for
             * every row (a lock and parameter parsing in OpenSSL 3), a fifth of the sealing's time */
            SHA256_CTX sha;
            ok = SHA256_Init(&sha) == 1 && SHA256_Update(&sha, lengths, 4) == 1 &&
                 SHA256_Update(&sha, pseudonym, (size_t)width) == 1 && SHA256_Update(&sha, nonce, 12) == 1 &&
                 SHA256_Update(&sha, lengths + 4, 4) == 1 && SHA256_Update(&sha, sealed, sealed_len) == 1 &&
                 SHA256_Final((unsigned char *)row_hashes.buf + 32 * i, &sha) == 1;
        }
        if (!ok)
            break;
        memcpy(w, row_start.buf, (size_t)row_start.len);
        w += row_start.len;
        memcpy(w, pseudonym, (size_t)width);
        w += width;
        memcpy(w, row_middle.buf, (size_t)row_middle.len);
        w += row_middle.len;
        if (binary) {  /* the nonce's length is row_middle's end; the sealed value's length goes before it */
            memcpy(w, nonce, 12);
            w += 12;
            uint32_t sealed_len = (uint32_t)(plen + 16);
            for (int k = 0; k < 4; k++) w[k] = (char)(sealed_len >> (8 * (3 - k)));
            memcpy(w + 4, sealed, plen + 16);
            w += 4 + plen + 16;
        } else {
            memcpy(w, "\\\\x", 3);
            w = put_hex(w + 3, nonce, 12);
            memcpy(w, "\t\\\\x", 4);
            w = put_hex(w + 4, sealed, plen + 16);
        }
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

/* --- ValueFunction: one pseudonymised column as a per-value callable (SQLite's application-defined function) --- */
/*
 * ValueFunction(keyed or None, alphabet, length, prefix (UTF-8), callback or None, program, flush, flush_every)
 *
 * Called with one value as Python's sqlite3 module hands it over (None, int, str, bytes, float), it gives the
 * pseudonym (str) or None, as canonical.py and the column path define them: text through the column's
 * normalisers (the ASCII `program`, or `callback` for non-ASCII text: normalisers then NFC, as UTF-8),
 * integers in decimal, bytes as they are; floats (and anything else) are refused with a TypeError naming
 * only the value's type. Each MAC goes into a buffer that `flush(macs)` (the run's collision check) receives
 * every `flush_every` values and at `.flush()`. The first exception (a refused value, the collision check
 * failing) is kept in `.error` with the row (1-based call number) in `.error_row`, since sqlite3 replaces
 * a function's exception with a generic one; later calls fail at once. Counts: `.calls`, `.nulls`, `.values`.
 */
typedef struct {
    PyObject_HEAD
    KeyedObject *keyed; /* NULL: randomised */
    int alphabet, length;
    PyObject *prefix;   /* bytes, UTF-8 */
    PyObject *callback; /* NULL or callable(bytes) -> bytes */
    PyObject *program;  /* bytes */
    PyObject *flush;    /* callable(bytes) */
    Py_ssize_t flush_every;
    Buf macs, normal;
    Random rnd;
    Py_ssize_t calls, nulls, values;
    PyObject *error;
    Py_ssize_t error_row;
} ValueFunctionObject;

static int ValueFunction_init(ValueFunctionObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"keyed", "alphabet", "length", "prefix", "callback", "program", "flush", "flush_every",
                             NULL};
    PyObject *keyed, *prefix, *callback, *program, *flush;
    Py_ssize_t flush_every;
    int alphabet, length;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiiSOSOn", kwlist, &keyed, &alphabet, &length, &prefix, &callback,
                                     &program, &flush, &flush_every))
        return -1;
    if (keyed != Py_None && !PyObject_TypeCheck(keyed, &KeyedType)) {
        PyErr_SetString(PyExc_TypeError, "keyed must be a Keyed or None (randomised)");
        return -1;
    }
    if (alphabet < 0 || alphabet > 3 || length < 1 || length > 77 || flush_every < 1) {
        PyErr_SetString(PyExc_ValueError, "alphabet must be 0-3, length 1-77 and flush_every positive");
        return -1;
    }
    if ((callback != Py_None && !PyCallable_Check(callback)) || !PyCallable_Check(flush)) {
        PyErr_SetString(PyExc_TypeError, "callback must be callable or None, and flush callable");
        return -1;
    }
    const unsigned char *prog = (const unsigned char *)PyBytes_AS_STRING(program);
    Py_ssize_t prog_len = PyBytes_GET_SIZE(program);
    for (Py_ssize_t k = 0; k < prog_len; k++) { /* as parse_column checks it */
        unsigned char op = prog[k];
        if (op == 'r' && k + 1 < prog_len && k + 1 + prog[k + 1] < prog_len) {
            k += 1 + prog[k + 1];
        } else if (op != 's' && op != 'l' && op != 'u' && op != 'w') {
            PyErr_SetString(PyExc_ValueError, "a normaliser program holds only s, l, u, w and r<n><chars>");
            return -1;
        }
    }
    Py_XSETREF(self->keyed, keyed == Py_None ? NULL : (KeyedObject *)Py_NewRef(keyed));
    Py_XSETREF(self->prefix, Py_NewRef(prefix));
    Py_XSETREF(self->callback, callback == Py_None ? NULL : Py_NewRef(callback));
    Py_XSETREF(self->program, Py_NewRef(program));
    Py_XSETREF(self->flush, Py_NewRef(flush));
    self->alphabet = alphabet;
    self->length = length;
    self->flush_every = flush_every;
    return 0;
}

static int ValueFunction_traverse(ValueFunctionObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->keyed);
    Py_VISIT(self->callback);
    Py_VISIT(self->flush);
    Py_VISIT(self->error);
    return 0;
}

static int ValueFunction_clear(ValueFunctionObject *self) {
    Py_CLEAR(self->keyed);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->callback);
    Py_CLEAR(self->program);
    Py_CLEAR(self->flush);
    Py_CLEAR(self->error);
    return 0;
}

static void ValueFunction_dealloc(ValueFunctionObject *self) {
    PyObject_GC_UnTrack(self);
    ValueFunction_clear(self);
    free(self->macs.data);
    if (self->normal.data) {
        OPENSSL_cleanse(self->normal.data, self->normal.cap);
        free(self->normal.data);
    }
    OPENSSL_cleanse(&self->rnd, sizeof self->rnd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The buffered MACs to `flush`; 0, or -1 with an exception set. */
static int value_function_flush(ValueFunctionObject *self) {
    if (self->macs.len == 0)
        return 0;
    PyObject *blob = PyBytes_FromStringAndSize((const char *)self->macs.data, (Py_ssize_t)self->macs.len);
    if (blob == NULL)
        return -1;
    self->macs.len = 0;
    PyObject *res = PyObject_CallOneArg(self->flush, blob);
    Py_DECREF(blob);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* Keep the pending exception as the function's error (the first one only), then let it propagate. */
static PyObject *value_function_fail(ValueFunctionObject *self) {
    if (self->error == NULL) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (tb != NULL && exc != NULL)
            PyException_SetTraceback(exc, tb);
        self->error = Py_NewRef(exc != NULL ? exc : Py_None);
        self->error_row = self->calls;
        PyErr_Restore(type, exc, tb);
    }
    return NULL;
}

static PyObject *ValueFunction_call(ValueFunctionObject *self, PyObject *args, PyObject *kwds) {
    if (kwds != NULL || PyTuple_GET_SIZE(args) != 1) {
        PyErr_SetString(PyExc_TypeError, "a pseudonym function takes exactly one value");
        return NULL;
    }
    if (self->error != NULL || self->flush == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the pseudonym function already failed or is closed");
        return NULL;
    }
    self->calls++;
    PyObject *value = PyTuple_GET_ITEM(args, 0), *normal = NULL;
    const unsigned char *data;
    Py_ssize_t len;
    char digits[24];
    if (value == Py_None) {
        self->nulls++;
        Py_RETURN_NONE;
    }
    if (PyUnicode_Check(value)) {
        data = (const unsigned char *)PyUnicode_AsUTF8AndSize(value, &len);
        if (data == NULL)
            return value_function_fail(self);
        if (PyUnicode_IS_ASCII(value)) {
            Py_ssize_t plen = PyBytes_GET_SIZE(self->program);
            if (plen) {
                if (buf_reserve(&self->normal, (size_t)len + 1) < 0) {
                    PyErr_NoMemory();
                    return value_function_fail(self);
                }
                memcpy(self->normal.data, data, (size_t)len);
                len = (Py_ssize_t)ascii_normalise((const unsigned char *)PyBytes_AS_STRING(self->program), (size_t)plen,
                                                  self->normal.data, (size_t)len);
                data = self->normal.data;
            }
        } else if (self->callback != NULL) {
            normal = call_callback(self->callback, data, (size_t)len);
            if (normal == NULL)
                return value_function_fail(self);
            data = (const unsigned char *)PyBytes_AS_STRING(normal);
            len = PyBytes_GET_SIZE(normal);
        }
    } else if (PyLong_CheckExact(value) || (PyLong_Check(value) && !PyBool_Check(value))) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) { /* not from SQLite (64-bit integers): the exact route */
            PyErr_Clear();
            normal = PyObject_Str(value);
            if (normal == NULL)
                return value_function_fail(self);
            Py_SETREF(normal, PyUnicode_AsUTF8String(normal));
            if (normal == NULL)
                return value_function_fail(self);
            data = (const unsigned char *)PyBytes_AS_STRING(normal);
            len = PyBytes_GET_SIZE(normal);
        } else {
            len = snprintf(digits, sizeof digits, "%lld", v);
            data = (const unsigned char *)digits;
        }
    } else if (PyBytes_Check(value)) {
        data = (const unsigned char *)PyBytes_AS_STRING(value);
        len = PyBytes_GET_SIZE(value);
    } else {
        PyErr_Format(PyExc_TypeError, "%s", PyFloat_Check(value) ? "floating-point" : Py_TYPE(value)->tp_name);
        return value_function_fail(self);
    }
    if (buf_reserve(&self->macs, 32) < 0) {
        Py_XDECREF(normal);
        PyErr_NoMemory();
        return value_function_fail(self);
    }
    unsigned char *mac = self->macs.data + self->macs.len;
    if (self->keyed != NULL) {
        keyed_mac(self->keyed, data, (size_t)len, mac);
    } else if (random_mac(&self->rnd, mac) < 0) {
        Py_XDECREF(normal);
        PyErr_SetString(PyExc_OSError, "the operating system's random generator failed");
        return value_function_fail(self);
    }
    Py_XDECREF(normal);
    if (self->normal.data != NULL && data == self->normal.data)
        OPENSSL_cleanse(self->normal.data, (size_t)len);
    self->macs.len += 32;
    self->values++;
    Py_ssize_t plen = PyBytes_GET_SIZE(self->prefix);
    char out[256];
    memcpy(out, PyBytes_AS_STRING(self->prefix), (size_t)plen);
    encode_mac(mac, self->alphabet, self->length, out + plen);
    PyObject *result = PyUnicode_DecodeUTF8(out, plen + self->length, "strict");
    if (result == NULL)
        return value_function_fail(self);
    if ((Py_ssize_t)(self->macs.len / 32) >= self->flush_every && value_function_flush(self) < 0) {
        Py_DECREF(result);
        return value_function_fail(self);
    }
    return result;
}

/* Drop the key, callback and flush: the callable may stay registered on a pooled connection (sqlite3 before
 * Python 3.13 cannot unregister a function), holding nothing. */
static PyObject *ValueFunction_close(ValueFunctionObject *self, PyObject *unused) {
    Py_CLEAR(self->keyed);
    Py_CLEAR(self->callback);
    Py_CLEAR(self->flush);
    if (self->error == NULL)
        self->error = Py_NewRef(Py_None); /* every later call fails at once */
    Py_RETURN_NONE;
}

static PyObject *ValueFunction_flush(ValueFunctionObject *self, PyObject *unused) {
    if (self->flush == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the pseudonym function is closed");
        return NULL;
    }
    if (value_function_flush(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ValueFunction_get(ValueFunctionObject *self, void *which) {
    switch ((intptr_t)which) {
    case 0: return PyLong_FromSsize_t(self->calls);
    case 1: return PyLong_FromSsize_t(self->nulls);
    case 2: return PyLong_FromSsize_t(self->values);
    case 3: return Py_NewRef(self->error ? self->error : Py_None); /* None once closed, too */
    default: return PyLong_FromSsize_t(self->error_row);
    }
}

static PyGetSetDef ValueFunction_getset[] = {
    {"calls", (getter)ValueFunction_get, NULL, "values received (NULLs included)", (void *)0},
    {"nulls", (getter)ValueFunction_get, NULL, "NULLs received", (void *)1},
    {"values", (getter)ValueFunction_get, NULL, "values pseudonymised", (void *)2},
    {"error", (getter)ValueFunction_get, NULL, "the first exception raised inside a call, or None", (void *)3},
    {"error_row", (getter)ValueFunction_get, NULL, "the call (1-based) that raised it", (void *)4},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef ValueFunction_methods[] = {
    {"flush", (PyCFunction)ValueFunction_flush, METH_NOARGS, "Hand the buffered MACs to the flush callable."},
    {"close", (PyCFunction)ValueFunction_close, METH_NOARGS, "Drop the key: every later call fails."},
    {NULL, NULL, 0, NULL},
};

static PyObject *ValueFunction_repr(PyObject *self) { return PyUnicode_FromString("<ValueFunction (key hidden)>"); }

static PyTypeObject ValueFunctionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pseudonymise.core._native.ValueFunction",
    .tp_basicsize = sizeof(ValueFunctionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ValueFunction(keyed, alphabet, length, prefix, callback, program, flush, flush_every): one column's "
              "pseudonym per value, for SQLite's create_function.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ValueFunction_init,
    .tp_dealloc = (destructor)ValueFunction_dealloc,
    .tp_traverse = (traverseproc)ValueFunction_traverse,
    .tp_clear = (inquiry)ValueFunction_clear,
    .tp_call = (ternaryfunc)ValueFunction_call,
    .tp_methods = ValueFunction_methods,
    .tp_getset = ValueFunction_getset,
    .tp_repr = ValueFunction_repr,
};

/* --- ValueFunction as SQLite's own function (no Python call per value) ----------------------------- */
/*
 * sqlite_register(connection, name, function, deterministic, expected_version, module_file) -> bool
 * sqlite_unregister(connection, name) -> None
 *
 * Registers a ValueFunction with sqlite3_create_function_v2 on the sqlite3 handle behind a Python
 * sqlite3.Connection (its first field after the object header, in every CPython 3 release), through the
 * libsqlite3 the sqlite3 module already loaded (dlopen with RTLD_NOLOAD; nothing is loaded that was not
 * there). SQLite then calls `sqlite_value_function` per value while sqlite3 has released the GIL: the
 * canonical bytes, MAC and pseudonym are made without any Python object; the GIL is taken only for
 * non-ASCII text (the normaliser callback, which also checks the text is UTF-8), to hand a block of MACs to
 * the collision check, and to keep an error. Same results and errors as calling the ValueFunction from Python:
 * an error is kept on the function (`.error`, `.error_row`) and SQLite is told "user-defined function raised
 * exception", the text sqlite3 gives for a Python function's. Returns False (nothing registered) when the
 * library is not loaded as a shared library, lacks a symbol, is not the version the sqlite3 module reports, or
 * is not the one the module's extension file (`module_file`) resolves its SQLite functions to.
 */
#include <dlfcn.h>

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_context sqlite3_context;
typedef struct sqlite3_value sqlite3_value;
typedef void (*sqlite_xfunc)(sqlite3_context *, int, sqlite3_value **);
enum { SQL_INTEGER = 1, SQL_FLOAT = 2, SQL_TEXT = 3, SQL_BLOB = 4, SQL_NULL = 5 };
#define SQL_UTF8 1
#define SQL_DETERMINISTIC 0x000000800
#define SQL_TRANSIENT ((void (*)(void *))-1)

static struct {
    int ready; /* 0 not tried, 1 usable, -1 not usable */
    int (*create_function_v2)(sqlite3 *, const char *, int, int, void *, sqlite_xfunc, sqlite_xfunc, void (*)(sqlite3_context *),
                              void (*)(void *));
    int (*libversion_number)(void);
    void *(*user_data)(sqlite3_context *);
    int (*value_type)(sqlite3_value *);
    const unsigned char *(*value_text)(sqlite3_value *);
    const void *(*value_blob)(sqlite3_value *);
    int (*value_bytes)(sqlite3_value *);
    long long (*value_int64)(sqlite3_value *);
    void (*result_text)(sqlite3_context *, const char *, int, void (*)(void *));
    void (*result_null)(sqlite3_context *);
    void (*result_error)(sqlite3_context *, const char *, int);
} SQL;

static int sqlite_symbols(void) {
    if (SQL.ready)
        return SQL.ready > 0;
    SQL.ready = -1;
    void *lib = dlopen("libsqlite3.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        return 0;
#define SYM(field, name) if ((*(void **)&SQL.field = dlsym(lib, name)) == NULL) return 0;
    SYM(create_function_v2, "sqlite3_create_function_v2")
    SYM(libversion_number, "sqlite3_libversion_number")
    SYM(user_data, "sqlite3_user_data")
    SYM(value_type, "sqlite3_value_type")
    SYM(value_text, "sqlite3_value_text")
    SYM(value_blob, "sqlite3_value_blob")
    SYM(value_bytes, "sqlite3_value_bytes")
    SYM(value_int64, "sqlite3_value_int64")
    SYM(result_text, "sqlite3_result_text")
    SYM(result_null, "sqlite3_result_null")
    SYM(result_error, "sqlite3_result_error")
#undef SYM
    SQL.ready = 1;
    return 1;
}

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
} SqliteConnectionHead;

static const char FUNCTION_FAILED[] = "user-defined function raised exception";

/* Keep the pending Python exception on the function (GIL held), and tell SQLite the call failed. */
static void sqlite_fail(ValueFunctionObject *self, sqlite3_context *ctx) {
    value_function_fail(self);
    PyErr_Clear();
    SQL.result_error(ctx, FUNCTION_FAILED, -1);
}

static void sqlite_value_function(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
    ValueFunctionObject *self = SQL.user_data(ctx);
    if (self->error != NULL || self->flush == NULL || argc != 1) {
        SQL.result_error(ctx, FUNCTION_FAILED, -1);
        return;
    }
    self->calls++;
    int type = SQL.value_type(argv[0]);
    const unsigned char *data = NULL;
    size_t len = 0;
    char digits[24];
    PyObject *normal = NULL;
    PyGILState_STATE gil;
    if (type == SQL_NULL) {
        self->nulls++;
        SQL.result_null(ctx);
        return;
    }
    if (type == SQL_INTEGER) {
        len = (size_t)snprintf(digits, sizeof digits, "%lld", SQL.value_int64(argv[0]));
        data = (const unsigned char *)digits;
    } else if (type == SQL_BLOB) {
        len = (size_t)SQL.value_bytes(argv[0]);
        data = len ? SQL.value_blob(argv[0]) : (const unsigned char *)"";
    } else if (type == SQL_TEXT) {
        data = SQL.value_text(argv[0]);
        len = (size_t)SQL.value_bytes(argv[0]);
        int ascii = 1;
        for (size_t i = 0; i < len; i++)
            if (data[i] & 0x80) { ascii = 0; break; }
        if (ascii) {
            Py_ssize_t plen = PyBytes_GET_SIZE(self->program);
            if (plen) {
                if (buf_reserve(&self->normal, len + 1) < 0) {
                    gil = PyGILState_Ensure();
                    PyErr_NoMemory();
                    sqlite_fail(self, ctx);
                    PyGILState_Release(gil);
                    return;
                }
                memcpy(self->normal.data, data, len);
                len = ascii_normalise((const unsigned char *)PyBytes_AS_STRING(self->program), (size_t)plen,
                                      self->normal.data, len);
                data = self->normal.data;
            }
        } else {
            /* as sqlite3 would: the text must be UTF-8 (a str), then the column's normalisers and NFC */
            gil = PyGILState_Ensure();
            PyObject *text = PyUnicode_DecodeUTF8((const char *)data, (Py_ssize_t)len, "strict");
            if (text == NULL) {
                sqlite_fail(self, ctx);
                PyGILState_Release(gil);
                return;
            }
            Py_DECREF(text);
            if (self->callback != NULL) {
                normal = call_callback(self->callback, data, len);
                if (normal == NULL) {
                    sqlite_fail(self, ctx);
                    PyGILState_Release(gil);
                    return;
                }
                data = (const unsigned char *)PyBytes_AS_STRING(normal);
                len = (size_t)PyBytes_GET_SIZE(normal);
            }
            PyGILState_Release(gil); /* `normal` stays alive (our reference) until it is hashed below */
        }
    } else {
        gil = PyGILState_Ensure();
        PyErr_SetString(PyExc_TypeError, type == SQL_FLOAT ? "floating-point" : "unknown");
        sqlite_fail(self, ctx);
        PyGILState_Release(gil);
        return;
    }
    if (buf_reserve(&self->macs, 32) < 0) {
        gil = PyGILState_Ensure();
        Py_XDECREF(normal);
        PyErr_NoMemory();
        sqlite_fail(self, ctx);
        PyGILState_Release(gil);
        return;
    }
    unsigned char *mac = self->macs.data + self->macs.len;
    int random_failed = 0;
    if (self->keyed != NULL)
        keyed_mac(self->keyed, data, len, mac);
    else
        random_failed = random_mac(&self->rnd, mac) < 0;
    if (self->normal.data != NULL && data == self->normal.data)
        OPENSSL_cleanse(self->normal.data, len);
    if (normal != NULL || random_failed) {
        gil = PyGILState_Ensure();
        Py_XDECREF(normal);
        if (random_failed) {
            PyErr_SetString(PyExc_OSError, "the operating system's random generator failed");
            sqlite_fail(self, ctx);
            PyGILState_Release(gil);
            return;
        }
        PyGILState_Release(gil);
    }
    self->macs.len += 32;
    self->values++;
    Py_ssize_t plen = PyBytes_GET_SIZE(self->prefix);
    char out[256];
    memcpy(out, PyBytes_AS_STRING(self->prefix), (size_t)plen);
    encode_mac(mac, self->alphabet, self->length, out + plen);
    if ((Py_ssize_t)(self->macs.len / 32) >= self->flush_every) {
        gil = PyGILState_Ensure();
        if (value_function_flush(self) < 0) {
            sqlite_fail(self, ctx);
            PyGILState_Release(gil);
            return;
        }
        PyGILState_Release(gil);
    }
    SQL.result_text(ctx, out, (int)(plen + self->length), SQL_TRANSIENT);
}

static int sqlite_handle(PyObject *conn, sqlite3 **db) {
    PyObject *module = PyImport_ImportModule("sqlite3");
    if (module == NULL)
        return -1;
    PyObject *cls = PyObject_GetAttrString(module, "Connection");
    Py_DECREF(module);
    if (cls == NULL)
        return -1;
    int ok = PyObject_IsInstance(conn, cls);
    Py_DECREF(cls);
    if (ok <= 0) {
        if (ok == 0)
            PyErr_SetString(PyExc_TypeError, "expected a sqlite3.Connection");
        return -1;
    }
    *db = ((SqliteConnectionHead *)conn)->db;
    if (*db == NULL) {
        PyErr_SetString(PyExc_ValueError, "the sqlite3 connection is closed");
        return -1;
    }
    return 0;
}

/* Whether the sqlite3 module (its extension file, already loaded) resolves SQLite to the very library whose
 * functions we hold: not a copy of SQLite linked into the module, nor another libsqlite3 beside it. */
static int sqlite_is_the_modules(const char *module_file) {
    void *module = dlopen(module_file, RTLD_NOW | RTLD_NOLOAD);
    if (module == NULL)
        return 0;
    void *theirs = dlsym(module, "sqlite3_libversion_number");
    dlclose(module); /* RTLD_NOLOAD took a reference: give it back */
    return theirs != NULL && theirs == *(void **)&SQL.libversion_number;
}

static PyObject *py_sqlite_register(PyObject *module, PyObject *args) {
    PyObject *conn, *function;
    const char *name, *module_file;
    int deterministic, expected_version;
    sqlite3 *db;
    if (!PyArg_ParseTuple(args, "OsO!pis", &conn, &name, &ValueFunctionType, &function, &deterministic,
                          &expected_version, &module_file))
        return NULL;
    if (sqlite_handle(conn, &db) < 0)
        return NULL;
    if (!sqlite_symbols() || SQL.libversion_number() != expected_version || !sqlite_is_the_modules(module_file))
        Py_RETURN_FALSE;
    int rc = SQL.create_function_v2(db, name, 1, SQL_UTF8 | (deterministic ? SQL_DETERMINISTIC : 0), function,
                                    sqlite_value_function, NULL, NULL, NULL);
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "SQLite refused the function (code %d)", rc);
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *py_sqlite_unregister(PyObject *module, PyObject *args) {
    PyObject *conn;
    const char *name;
    sqlite3 *db;
    if (!PyArg_ParseTuple(args, "Os", &conn, &name))
        return NULL;
    if (sqlite_handle(conn, &db) < 0)
        return NULL;
    if (!sqlite_symbols()) {
        PyErr_SetString(PyExc_RuntimeError, "no function was registered through libsqlite3 here");
        return NULL;
    }
    int rc = SQL.create_function_v2(db, name, 1, SQL_UTF8, NULL, NULL, NULL, NULL, NULL);
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "SQLite did not remove the function (code %d)", rc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"copy_block", py_copy_block, METH_VARARGS, "Pseudonymise a block of COPY text rows (see the source)."},
    {"seal_rows", py_seal_rows, METH_VARARGS, "Escrow rows in COPY text, every value sealed with AES-256-GCM."},
    {"recent_known", py_recent_known, METH_VARARGS, "Which MACs the table of recent MACs holds (see the source)."},
    {"recent_remember", py_recent_remember, METH_VARARGS, "MACs into the table of recent MACs (see the source)."},
    {"recent_unseen", py_recent_unseen, METH_VARARGS, "Which MACs the table of recent MACs did not hold, each put in it "
                                                      "in order (see the source)."},
    {"seen_known", py_seen_known, METH_VARARGS, "Which MACs the run's set of sealed MACs holds (see the source)."},
    {"seen_add", py_seen_add, METH_VARARGS, "MACs into the run's set of sealed MACs, up to a room (see the source)."},
    {"collision_add", py_collision_add, METH_VARARGS, "Records into the collision check's table (see the source)."},
    {"collision_place", py_collision_place, METH_VARARGS, "Index held records into an empty collision table."},
    {"arrow_column", py_arrow_column, METH_VARARGS, "Pseudonymise one Arrow array from its buffers (see the source)."},
    {"sqlite_register", py_sqlite_register, METH_VARARGS, "Register a ValueFunction as SQLite's own function."},
    {"sqlite_unregister", py_sqlite_unregister, METH_VARARGS, "Remove a function registered by sqlite_register."},
    {"encode", py_encode, METH_VARARGS, "encode(macs, alphabet, length): pseudonym characters, `length` per MAC."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "pseudonymise.core._native", "The pseudonym engine's hot loop in C.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&KeyedType) < 0 || PyType_Ready(&ValueFunctionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Keyed", (PyObject *)&KeyedType) < 0
        || PyModule_AddObjectRef(m, "ValueFunction", (PyObject *)&ValueFunctionType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "HEX", ALPHA_HEX);
    PyModule_AddIntConstant(m, "BASE32", ALPHA_BASE32);
    PyModule_AddIntConstant(m, "BASE64URL", ALPHA_BASE64URL);
    PyModule_AddIntConstant(m, "DIGITS", ALPHA_DIGITS);
    return m;
}
