/*
 * The t-digest's per-sample update in C: `TDigest.merge_sorted` of one value
 * (the runtime's `merge_unsorted(vec![x])`), insert and recompress.
 *
 * Why C: this loop over up to 100 centroids runs for every latency and
 * token sample the learner folds (about 18 per capture-shaped run) and was
 * the largest single cost of learning: ~18 us per sample in the mypyc build,
 * mostly boxing and unboxing floats. Here it runs on plain doubles.
 *
 * Why the bits stay the same: every operation below is the one in
 * `tdigest.py` (itself the crate's order), on IEEE doubles, and the build
 * passes -ffp-contract=off (no fused multiply-add) without -ffast-math, so
 * `a + b * c` rounds twice as in Rust and Python. The tests compare this
 * kernel with the Python loop bit for bit and run the crate's vectors on it.
 *
 * Contract (tdigest.py calls it; anything unexpected returns None and the
 * caller takes the Python loop instead):
 *   merge_one(means: list[float], weights: list[float], value: float,
 *             count: float, max_size: int, is_sorted: bool)
 *     -> (means: list[float], weights: list[float], sum: float, in_order: bool)
 *   `count` is the digest's count after this sample; `in_order` False means
 *   re-rounding moved a mean past its neighbour and the caller must apply
 *   the crate's stable sort by mean (rare; kept in Python).
 *
 * Built by `python -m worker.engine.native build` with KERNEL_SOURCE_SHA set
 * to this file's SHA-256, which the loader checks, so an edited source never
 * runs a stale build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef KERNEL_SOURCE_SHA
#define KERNEL_SOURCE_SHA ""
#endif

/* The crate's scale function, as `_k_to_q` in tdigest.py. */
static double k_to_q(double k, double d) {
    double k_div_d = k / d;
    if (k_div_d >= 0.5) {
        double base = 1.0 - k_div_d;
        return 1.0 - 2.0 * base * base;
    }
    return 2.0 * k_div_d * k_div_d;
}

/* `Centroid::add(sum, weight)` on the current centroid, applied even when
   nothing was merged (it re-rounds heavy means); returns its new sum, which
   the digest's sum is rebuilt from. */
static inline double emit(double sums_to_merge, double weights_to_merge, double cur_m,
                          double cur_w, double *mean, double *weight) {
    double new_sum = sums_to_merge + cur_w * cur_m;
    double new_w = cur_w + weights_to_merge;
    *mean = new_sum / new_w;
    *weight = new_w;
    return new_sum;
}

/* Read a list of exact floats; 0 when an item is anything else. */
static int read_floats(PyObject *list, double *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyFloat_CheckExact(item)) {
            return 0;
        }
        out[i] = PyFloat_AS_DOUBLE(item);
    }
    return 1;
}

static PyObject *to_list(const double *values, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(values[i]);
        if (f == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, f);
    }
    return list;
}

static PyObject *merge_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "merge_one takes 6 arguments");
        return NULL;
    }
    PyObject *means = args[0], *weights = args[1];
    if (!PyList_CheckExact(means) || !PyList_CheckExact(weights) ||
        !PyFloat_CheckExact(args[2]) || !PyFloat_CheckExact(args[3]) ||
        !PyLong_CheckExact(args[4])) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(means);
    if (PyList_GET_SIZE(weights) != n) {
        Py_RETURN_NONE;
    }
    double value = PyFloat_AS_DOUBLE(args[2]);
    double count = PyFloat_AS_DOUBLE(args[3]);
    long max_size = PyLong_AsLong(args[4]);
    if (max_size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int is_sorted = PyObject_IsTrue(args[5]);
    if (is_sorted < 0) {
        return NULL;
    }

    /* One block: the old centroids, the merged input (n + 1), the output. */
    Py_ssize_t total_len = n + 2 * (n + 1) + 2 * (n + 1);
    double *buf = PyMem_Malloc(sizeof(double) * (size_t)(total_len + 1));
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    double *old = buf;              /* n: means, then reused for weights */
    double *in_m = buf + n;         /* n + 1 */
    double *in_w = in_m + (n + 1);  /* n + 1 */
    double *out_m = in_w + (n + 1); /* n + 1 */
    double *out_w = out_m + (n + 1);
    PyObject *result = NULL;

    /* Centroids taken before the value: those with mean < value (bisect_left
       on sorted means, as in tdigest.py; a linear scan otherwise). */
    if (!read_floats(means, old, n)) {
        goto decline;
    }
    Py_ssize_t at;
    if (is_sorted) {
        Py_ssize_t lo = 0, hi = n;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (old[mid] < value) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        at = lo;
    } else {
        at = n;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!(old[i] < value)) {
                at = i;
                break;
            }
        }
    }
    for (Py_ssize_t i = 0; i < at; i++) {
        in_m[i] = old[i];
    }
    in_m[at] = value;
    for (Py_ssize_t i = at; i < n; i++) {
        in_m[i + 1] = old[i];
    }
    if (!read_floats(weights, old, n)) {
        goto decline;
    }
    for (Py_ssize_t i = 0; i < at; i++) {
        in_w[i] = old[i];
    }
    in_w[at] = 1.0;
    for (Py_ssize_t i = at; i < n; i++) {
        in_w[i + 1] = old[i];
    }

    /* `_compress(..., second_k=2)`, operation for operation. */
    double d = (double)max_size;
    double total = 0.0;
    double q_limit_times_count = k_to_q(1.0, d) * count;
    long k_limit = 2;
    double cur_m = in_m[0], cur_w = in_w[0];
    double weight_so_far = cur_w;
    double sums_to_merge = 0.0, weights_to_merge = 0.0;
    Py_ssize_t emitted = 0;
    for (Py_ssize_t j = 1; j <= n; j++) {
        double nm = in_m[j], nw = in_w[j];
        weight_so_far += nw;
        if (weight_so_far <= q_limit_times_count) {
            sums_to_merge += nm * nw;
            weights_to_merge += nw;
        } else {
            total += emit(sums_to_merge, weights_to_merge, cur_m, cur_w, &out_m[emitted],
                          &out_w[emitted]);
            emitted++;
            sums_to_merge = 0.0;
            weights_to_merge = 0.0;
            q_limit_times_count = k_to_q((double)k_limit, d) * count;
            k_limit++;
            cur_m = nm;
            cur_w = nw;
        }
    }
    total += emit(sums_to_merge, weights_to_merge, cur_m, cur_w, &out_m[emitted],
                  &out_w[emitted]);
    emitted++;
    int in_order = 1;
    for (Py_ssize_t i = 1; i < emitted; i++) {
        if (out_m[i] < out_m[i - 1]) {
            in_order = 0;
            break;
        }
    }

    PyObject *lm = to_list(out_m, emitted);
    PyObject *lw = lm == NULL ? NULL : to_list(out_w, emitted);
    if (lw != NULL) {
        result = Py_BuildValue("(NNdO)", lm, lw, total, in_order ? Py_True : Py_False);
    } else {
        Py_XDECREF(lm);
    }
    PyMem_Free(buf);
    return result;

decline:
    PyMem_Free(buf);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"merge_one", (PyCFunction)(void (*)(void))merge_one, METH_FASTCALL,
     "Insert one sample and recompress (see the file's header)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tdigest_kernel", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__tdigest_kernel(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "SOURCE_SHA", KERNEL_SOURCE_SHA) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
