"""Python peers for `cargo xtask bench --peers`: joblib (threading, loky) and
concurrent.futures (thread and process pools) on the scenarios of parjob's bench.

Run by xtask inside target/bench/venv; writes one JSON file in the shape parjob-bench reads
(one row per scenario, variant and implementation, `samples` in seconds). Each peer runs
the same kind of work as the Rust rows; where the work must differ (Python is ~100x slower
per call), the row's `work` and `note` say so and the ratio is taken on throughput.

    python bench_peers.py --out peers.json [--quick] [--scenario NAME]...

With --mpi it runs the `mpi` group's peer instead, mpi4py.futures, and must be started as
`mpirun -n 3 python -m mpi4py.futures bench_peers.py --mpi --out mpi_peers.json` (rank 0 runs
this script, ranks 1 and 2 are MPIPoolExecutor's workers); `cargo xtask bench --peers` does.
"""

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

T0 = time.perf_counter()
import joblib  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402

JOBLIB_IMPORT_S = time.perf_counter() - T0

try:
    import numpy as np
except ImportError:  # the numpy scenarios then say why they did not run
    np = None

SCENARIOS = ["small", "tiny", "cpu_halves", "sleep_io", "startup", "big_input", "big_result", "crash",
             "first_result", "memory", "mpi"]
JT, JL, TP, PP = "joblib threading", "joblib loky", "ThreadPoolExecutor", "ProcessPoolExecutor"


# ---- task functions (module level, so that process pools can pickle them) ----

def square(x):
    return x * x


def nap(ms):
    time.sleep(ms / 1000)
    return ms


def sum_squares(seed, count):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=count, dtype=np.uint64)
    return int((a * a).sum())


def sum_array(a):
    return float(a.sum())


def abort_now():
    import faulthandler
    faulthandler.disable()  # loky enables it: the abort would print a traceback per crash
    os.abort()


# ---- method: warm-up, then interleaved counted repeats ----

def row(scenario, variant, impl, samples=None, work=0.0, unit="", status=None, note=""):
    return {
        "scenario": scenario,
        "variant": variant,
        "implementation": impl,
        "group": "peer",
        "work": work,
        "unit": unit,
        "samples": samples or [],
        "status": status or {"kind": "measured"},
        "note": note,
    }


def unavailable(scenario, variant, impl, reason):
    return row(scenario, variant, impl, status={"kind": "unavailable", "reason": reason})


def interleaved(scenario, candidates, warmups, repeats):
    """candidates: list of dicts with variant, impl, run (returns seconds), work, unit, note."""
    results = {id(c): [] for c in candidates}
    failed = {}
    for r in range(warmups + repeats):
        for c in candidates:
            if id(c) in failed:
                continue
            try:
                seconds = c["run"]()
            except Exception as e:  # a peer that fails is reported, the others go on
                failed[id(c)] = f"{type(e).__name__}: {e}"
                continue
            if r >= warmups:
                results[id(c)].append(seconds)
    out = []
    for c in candidates:
        if id(c) in failed:
            status = {"kind": "failed", "reason": failed[id(c)]}
            out.append(row(scenario, c["variant"], c["impl"], status=status, note=c.get("note", "")))
        else:
            out.append(row(scenario, c["variant"], c["impl"], results[id(c)], c.get("work", 0.0),
                           c.get("unit", ""), note=c.get("note", "")))
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def shutdown_loky():
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)


# ---- scenarios ----

def tiny(a):
    scale = 4 if a.quick else 1
    sizes = {JT: 20_000 // scale, TP: 20_000 // scale, JL: 100_000 // scale, PP: 200_000 // scale}
    tp, pp = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    runs = {
        JT: lambda n: Parallel(n_jobs=2, backend="threading")(delayed(square)(i) for i in range(n)),
        JL: lambda n: Parallel(n_jobs=2, backend="loky")(delayed(square)(i) for i in range(n)),
        TP: lambda n: list(tp.map(square, range(n))),
        PP: lambda n: list(pp.map(square, range(n), chunksize=12_500 // scale)),
    }
    cands = [
        {"variant": "", "impl": impl, "run": (lambda f=f, n=sizes[impl]: timed(lambda: f(n))),
         "work": float(sizes[impl]), "unit": "tasks",
         "note": f"{sizes[impl]} calls (fewer than the Rust rows: Python is slower per call); ratio on tasks/s"
                 + ("; chunksize=12500" if impl == PP and not a.quick else "")}
        for impl, f in runs.items()
    ]
    out = interleaved("tiny", cands, 1, a.repeats)
    tp.shutdown()
    pp.shutdown()
    return out


def cpu_halves(a):
    if np is None:
        return [unavailable("cpu_halves", "n_jobs=2", i, "numpy is not installed in the venv") for i in (JT, JL, TP, PP)]
    count = 10_000_000
    halves = [(1, count // 2), (2, count // 2)]
    cands = []
    pools = []
    for n in (1, 2):
        tp, pp = ThreadPoolExecutor(n), ProcessPoolExecutor(n)
        pools += [tp, pp]
        runs = {
            JT: lambda n=n: Parallel(n_jobs=n, backend="threading")(delayed(sum_squares)(*h) for h in halves),
            JL: lambda n=n: Parallel(n_jobs=n, backend="loky")(delayed(sum_squares)(*h) for h in halves),
            TP: lambda tp=tp: list(tp.map(sum_squares, *zip(*halves))),
            PP: lambda pp=pp: list(pp.map(sum_squares, *zip(*halves))),
        }
        for impl, f in runs.items():
            cands.append({"variant": f"n_jobs={n}", "impl": impl, "run": (lambda f=f: timed(f)),
                          "note": "numpy draws and squares each half inside the task"})
    out = interleaved("cpu_halves", cands, 1, a.repeats)
    for p in pools:
        p.shutdown()
    return out


def sleep_io(a):
    out = []
    for n in ((10, 100) if a.quick else (1, 10, 50, 100)):
        tp = ThreadPoolExecutor(n)
        cands = [
            {"variant": f"n_jobs={n}", "impl": JT,
             "run": lambda n=n: timed(lambda: Parallel(n_jobs=n, backend="threading")(delayed(nap)(10) for _ in range(100)))},
            {"variant": f"n_jobs={n}", "impl": TP,
             "run": lambda tp=tp: timed(lambda: list(tp.map(nap, [10] * 100)))},
        ]
        out += interleaved("sleep_io", cands, 1, a.repeats)
        tp.shutdown()
        for impl in (JL, PP):
            out.append(unavailable("sleep_io", f"n_jobs={n}", impl,
                                   "not run: up to 100 Python worker processes on this 2-core machine; "
                                   "threads are Python's tool for waiting"))
    return out


def startup(a):
    def joblib_fresh(backend):
        def run():
            if backend == "loky":
                shutdown_loky()
            return timed(lambda: Parallel(n_jobs=2, backend=backend)([delayed(square)(7)]))
        return run

    def pool_fresh(kind):
        def run():
            start = time.perf_counter()
            pool = kind(2)
            pool.submit(square, 7).result()
            elapsed = time.perf_counter() - start
            pool.shutdown()
            return elapsed
        return run

    warm_jt = Parallel(n_jobs=2, backend="threading")
    warm_jt.__enter__()
    tp, pp = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    cands = [
        {"variant": "fresh pool", "impl": JT, "run": joblib_fresh("threading")},
        {"variant": "fresh pool", "impl": JL, "run": joblib_fresh("loky"),
         "note": f"importing joblib took {JOBLIB_IMPORT_S * 1e3:.0f} ms more, not counted"},
        {"variant": "fresh pool", "impl": TP, "run": pool_fresh(ThreadPoolExecutor)},
        {"variant": "fresh pool", "impl": PP, "run": pool_fresh(ProcessPoolExecutor)},
        {"variant": "warm pool", "impl": JT, "run": lambda: timed(lambda: warm_jt([delayed(square)(7)]))},
        {"variant": "warm pool", "impl": JL,
         "run": lambda: timed(lambda: Parallel(n_jobs=2, backend="loky")([delayed(square)(7)]))},
        {"variant": "warm pool", "impl": TP, "run": lambda: timed(lambda: tp.submit(square, 7).result())},
        {"variant": "warm pool", "impl": PP, "run": lambda: timed(lambda: pp.submit(square, 7).result())},
    ]
    out = interleaved("startup", cands, 1, a.short_repeats)
    warm_jt.__exit__(None, None, None)
    tp.shutdown()
    pp.shutdown()
    return out


def big_input(a):
    if np is None:
        return [unavailable("big_input", v, i, "numpy is not installed in the venv")
                for v in ("first send", "warm pool") for i in (JT, JL, TP, PP)]
    data = (np.arange(12_500_000) % 1000) * 0.5
    h = data.size // 2
    halves = [data[:h], data[h:]]
    gb = data.nbytes / 1e9
    tp = ThreadPoolExecutor(2)
    pp = ProcessPoolExecutor(2)

    def first_loky():
        shutdown_loky()
        Parallel(n_jobs=2, backend="loky")([delayed(square)(1)])
        return timed(lambda: Parallel(n_jobs=2, backend="loky")(delayed(sum_array)(x) for x in halves))

    def first_pp():
        pool = ProcessPoolExecutor(2)
        pool.submit(square, 1).result()
        pool.submit(square, 1).result()
        elapsed = timed(lambda: list(pool.map(sum_array, halves)))
        pool.shutdown()
        return elapsed

    jt = lambda: timed(lambda: Parallel(n_jobs=2, backend="threading")(delayed(sum_array)(x) for x in halves))  # noqa: E731
    cands = [
        {"variant": "first send", "impl": JT, "run": jt},
        {"variant": "first send", "impl": JL, "run": first_loky, "note": "joblib memory-maps arrays over 1 MB"},
        {"variant": "first send", "impl": PP, "run": first_pp, "note": "halves pickled to the workers"},
        {"variant": "warm pool", "impl": JT, "run": jt},
        {"variant": "warm pool", "impl": JL,
         "run": lambda: timed(lambda: Parallel(n_jobs=2, backend="loky")(delayed(sum_array)(x) for x in halves)),
         "note": "joblib memory-maps arrays over 1 MB"},
        {"variant": "warm pool", "impl": TP, "run": lambda: timed(lambda: list(tp.map(sum_array, halves)))},
        {"variant": "warm pool", "impl": PP, "run": lambda: timed(lambda: list(pp.map(sum_array, halves))),
         "note": "halves pickled to the workers"},
    ]
    for c in cands:
        c["work"], c["unit"] = gb, "GB"
        if c["impl"] in (JT, TP):
            c["note"] = "sums views of one array: nothing is copied or freed, unlike the Rust rows"
    out = interleaved("big_input", cands, 1, a.repeats)
    tp.shutdown()
    pp.shutdown()
    return out


def make_values(n):
    return (np.arange(n) % 1000) * 0.5


def big_result(a):
    """2 tasks each making 12.5e6 float64 (100 MB) and returning them, as the Rust rows do."""
    if np is None:
        return [unavailable("big_result", v, i, "numpy is not installed in the venv")
                for v in ("first send", "warm pool") for i in (JT, JL, PP)]
    n = 12_500_000
    gb = 2 * n * 8 / 1e9
    pp = ProcessPoolExecutor(2)

    def loky():
        return timed(lambda: Parallel(n_jobs=2, backend="loky")(delayed(make_values)(n) for _ in range(2)))

    def first_loky():
        shutdown_loky()
        Parallel(n_jobs=2, backend="loky")([delayed(square)(1)])
        return loky()

    def first_pp():
        pool = ProcessPoolExecutor(2)
        pool.submit(square, 1).result()
        pool.submit(square, 1).result()
        elapsed = timed(lambda: list(pool.map(make_values, [n, n])))
        pool.shutdown()
        return elapsed

    jt = lambda: timed(lambda: Parallel(n_jobs=2, backend="threading")(delayed(make_values)(n) for _ in range(2)))  # noqa: E731
    cands = [
        {"variant": "first send", "impl": JT, "run": jt},
        {"variant": "first send", "impl": JL, "run": first_loky, "note": "results pickled back"},
        {"variant": "first send", "impl": PP, "run": first_pp, "note": "results pickled back"},
        {"variant": "warm pool", "impl": JT, "run": jt},
        {"variant": "warm pool", "impl": JL, "run": loky, "note": "results pickled back"},
        {"variant": "warm pool", "impl": PP, "run": lambda: timed(lambda: list(pp.map(make_values, [n, n]))),
         "note": "results pickled back"},
    ]
    for c in cands:
        c["work"], c["unit"] = gb, "GB"
    out = interleaved("big_result", cands, 1, a.repeats)
    pp.shutdown()
    return out


def crash(a):
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    def loky_crash():
        Parallel(n_jobs=2, backend="loky")([delayed(square)(1)])  # a started pool, untimed
        start = time.perf_counter()
        try:
            Parallel(n_jobs=2, backend="loky")([delayed(abort_now)()])
        except TerminatedWorkerError:
            return time.perf_counter() - start
        raise RuntimeError("the aborting task did not fail")

    def pp_crash():
        pool = ProcessPoolExecutor(2)
        pool.submit(square, 1).result()
        start = time.perf_counter()
        try:
            pool.submit(abort_now).result()
        except BrokenProcessPool:
            elapsed = time.perf_counter() - start
            pool.shutdown()
            return elapsed
        raise RuntimeError("the aborting task did not fail")

    cands = [
        {"variant": "abort to error", "impl": JL, "run": loky_crash},
        {"variant": "next call", "impl": JL,
         "run": lambda: timed(lambda: Parallel(n_jobs=2, backend="loky")([delayed(square)(3)])),
         "note": "loky starts a new executor after the crash"},
        {"variant": "abort to error", "impl": PP, "run": pp_crash,
         "note": "a new pool each time: a ProcessPoolExecutor is broken for good after a crash"},
    ]
    out = interleaved("crash", cands, 1, a.short_repeats)
    out.append(unavailable("crash", "next call", PP,
                           "BrokenProcessPool: the pool refuses every call after a worker crash"))
    for impl in (JT, TP):
        out.append(unavailable("crash", "abort to error", impl, "threads share the process an abort would end"))
    return out


def first_result(a):
    count = 4 if a.quick else 20
    tp, pp = ThreadPoolExecutor(2), ProcessPoolExecutor(2)

    def first_of(make):
        def run():
            start = time.perf_counter()
            it = iter(make())
            next(it)
            elapsed = time.perf_counter() - start
            for _ in it:
                pass
            return elapsed
        return run

    cands = [
        {"variant": "", "impl": JT, "run": first_of(lambda: Parallel(n_jobs=2, backend="threading", return_as="generator")(delayed(nap)(100) for _ in range(count)))},
        {"variant": "", "impl": JL, "run": first_of(lambda: Parallel(n_jobs=2, backend="loky", return_as="generator")(delayed(nap)(100) for _ in range(count)))},
        {"variant": "", "impl": TP, "run": first_of(lambda: tp.map(nap, [100] * count))},
        {"variant": "", "impl": PP, "run": first_of(lambda: pp.map(nap, [100] * count))},
    ]
    out = interleaved("first_result", cands, 1, a.repeats)
    tp.shutdown()
    pp.shutdown()
    return out


def small(a):
    return [unavailable("small", "", impl,
                        "not run: a 1 us task is a different amount of work in Python; tiny shows the per-call overhead")
            for impl in (JT, JL, TP, PP)]


def memory(a):
    """joblib.Memory, one pickle file per call: a fully cached re-run, and a first run that
    stores every result (the Rust rows store spin's results; here square's, per call)."""
    import shutil
    import tempfile
    from joblib import Memory
    # joblib writes a folder and files per call: a few thousand calls take tens of seconds.
    n = 500 if a.quick else 5_000
    n_store = 100 if a.quick else 1_000
    impl = "joblib.Memory"
    cached_dir = tempfile.mkdtemp(prefix="parjob-bench-joblib-memory-")
    cached_square = Memory(cached_dir, verbose=0).cache(square)
    for i in range(n):
        cached_square(i)

    def rerun():
        return [cached_square(i) for i in range(n)]

    def store():
        d = tempfile.mkdtemp(prefix="parjob-bench-joblib-memory-")
        f = Memory(d, verbose=0).cache(square)
        start = time.perf_counter()
        out = [f(i) for i in range(n_store)]
        elapsed = time.perf_counter() - start
        del out
        shutil.rmtree(d, ignore_errors=True)
        return elapsed

    note = f"{n} calls, one after another (fewer than the Rust rows: Python is slower per call)"
    cands = [
        {"variant": "cached re-run", "impl": impl, "run": lambda: timed(rerun),
         "work": float(n), "unit": "tasks", "note": note},
        {"variant": "tiny, storing", "impl": impl, "run": store, "work": float(n_store), "unit": "tasks",
         "note": f"{n_store} calls of square into an empty cache, one after another: every call stored"},
    ]
    out = interleaved("memory", cands, 1, a.repeats)
    shutil.rmtree(cached_dir, ignore_errors=True)
    return out


def mpi(a):
    """The `mpi` group's peer runs under mpirun (--mpi): nothing to do in the main run."""
    return []


def mpi_group(a):
    """mpi4py.futures on the `mpi` group's variants, in a world of rank 0 and 2 workers started
    by `mpirun -n 3 python -m mpi4py.futures`. The rows are written before the crash variant,
    which ends the whole job (mpirun tears it down when a rank aborts): its row then keeps the
    reason written for it."""
    import mpi4py
    from mpi4py.futures import MPIPoolExecutor
    impl = "mpi4py.futures"
    n = 200_000 if a.quick else 1_000_000
    ex = MPIPoolExecutor()
    list(ex.map(square, range(100)))  # the workers are up
    cands = [
        {"variant": "tiny", "impl": impl, "work": float(n), "unit": "tasks",
         "note": "MPIPoolExecutor.map(square, ..., chunksize=10000)",
         "run": lambda: timed(lambda: list(ex.map(square, range(n), chunksize=10_000)))},
    ]
    if np is not None:
        halves = [(1, 5_000_000), (2, 5_000_000)]
        cands += [
            {"variant": "cpu_halves, 1 rank", "impl": impl,
             "note": "one half at a time (submit, result, submit, result)",
             "run": lambda: timed(lambda: [ex.submit(sum_squares, *h).result() for h in halves])},
            {"variant": "cpu_halves, 2 ranks", "impl": impl,
             "run": lambda: timed(lambda: [f.result() for f in [ex.submit(sum_squares, *h) for h in halves]])},
        ]
    rows = interleaved("mpi", cands, 1, a.repeats)
    if np is None:
        rows += [unavailable("mpi", v, impl, "numpy is not installed") for v in
                 ("cpu_halves, 1 rank", "cpu_halves, 2 ranks")]
    time.sleep(0.3)  # as parjob's row: the world settles after the cpu_halves rows
    rows += interleaved("mpi", [{"variant": "warm small call", "impl": impl,
                                 "run": lambda: timed(lambda: ex.submit(square, 3).result())}],
                        1, a.short_repeats)
    versions = (f"{platform.python_implementation()} {platform.python_version()}, "
                f"mpi4py {mpi4py.__version__}")

    def write(extra):
        with open(a.out, "w") as f:
            json.dump({"versions": versions, "rows": rows + extra}, f, indent=1)

    died = ("a task's abort() ended the whole mpirun job (Open MPI tears it down when a rank "
            "dies): rank 0 never saw an exception")
    write([row("mpi", "abort to error", impl, status={"kind": "failed", "reason": died}),
           row("mpi", "next call", impl, status={"kind": "failed", "reason": died})])
    start = time.perf_counter()
    try:
        ex.submit(abort_now).result(timeout=30)
        crash = row("mpi", "abort to error", impl, status={"kind": "failed", "reason": "the abort returned"})
    except Exception as e:
        crash = row("mpi", "abort to error", impl, [time.perf_counter() - start],
                    note=f"{type(e).__name__}")
    try:
        nxt = row("mpi", "next call", impl, [timed(lambda: ex.submit(square, 3).result(timeout=30))])
    except Exception as e:
        nxt = row("mpi", "next call", impl, status={"kind": "failed", "reason": f"{type(e).__name__}: {e}"})
    write([crash, nxt])


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenario", action="append", choices=SCENARIOS)
    p.add_argument("--mpi", action="store_true", help="the mpi group's peer (under mpirun)")
    a = p.parse_args()
    a.repeats = 3 if a.quick else 5
    a.short_repeats = 5 if a.quick else 10
    if a.mpi:
        return mpi_group(a)
    rows = []
    for name in a.scenario or SCENARIOS:
        start = time.perf_counter()
        print(f"bench_peers: {name} ...", file=sys.stderr, flush=True)
        try:
            rows += globals()[name](a)
        except Exception as e:  # one broken scenario must not lose the others
            rows.append(unavailable(name, "", "Python peers", f"{type(e).__name__}: {e}"))
        print(f"bench_peers: {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    versions = f"{platform.python_implementation()} {platform.python_version()}, joblib {joblib.__version__}"
    versions += f", numpy {np.__version__}" if np is not None else ", no numpy"
    with open(a.out, "w") as f:
        json.dump({"versions": versions, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
