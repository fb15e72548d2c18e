"""The compiled-library cache (lemmse_ray.kernels.compiled) is private, checked, self-repairing and cleans up
after an interrupted build (issue 16, items 2, 3 and the compilation part of 13).

Libraries a test plants are built here with ``cc``; everything that could run a planted constructor, crash on
a damaged library or be killed runs in a subprocess with its own ``LEMMSE_RAY_CACHE`` and ``TMPDIR``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lemmse_ray.kernels import compiled

CC = compiled.compiler()
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler: the cache is never used")

PROBE = "int lemmse_probe(void) { return 42; }\n"
SIGNATURES = {"lemmse_probe": ([], ctypes.c_int)}
PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(%s, "w");
    if (f) { fputs("the planted constructor ran\n", f); fclose(f); }
}
int lemmse_probe(void) { return 7; }
"""
OTHER_UID = 12345  # "another user": the tests run as root, who may give files away


def build_shared_object(path: Path, source: str) -> bytes:
    """Compile ``source`` into the library ``path`` with the system compiler, independently of the package."""
    src = path.with_suffix(".c")
    src.write_text(source)
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(path)], check=True, capture_output=True)
    return path.read_bytes()


def libraries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.so") if p.is_file())


def sidecars(library: Path) -> list[Path]:
    """The digest files recorded beside ``library`` (none where the cache records no digest)."""
    return sorted(library.parent.glob("*.sha256"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_python(code: str, cache: Path, tmp: Path, env: dict | None = None, timeout: int = 600):
    tmp.mkdir(exist_ok=True)
    full = {**os.environ, "LEMMSE_RAY_CACHE": str(cache), "TMPDIR": str(tmp), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=full,
                          timeout=timeout)


LOAD_PROBES = f"""
import ctypes, json, os, warnings
from lemmse_ray.kernels import compiled
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    libs = [compiled.compile_library(compiled.compiler(), os.environ["LEMMSE_RAY_CACHE"], name, {PROBE!r},
                                     {{"lemmse_probe": ([], ctypes.c_int)}}) for name in ("probe", "probe_b")]
print(json.dumps({{"values": [None if lib is None else lib.lemmse_probe() for lib in libs],
                  "warnings": [str(w.message) for w in caught if str(w.message).startswith("lemmse_ray")]}}))
"""


# --- item 2: a private cache ---------------------------------------------------------------------------------

def test_cache_is_private_whatever_the_umask(tmp_path):
    """Under ``umask 000`` the directories the cache creates are 0700 and its files 0600 or 0700."""
    cache = tmp_path / "made" / "cache"
    previous = os.umask(0)
    try:
        lib = compiled.compile_library(CC, str(cache), "probe", PROBE, SIGNATURES)
    finally:
        os.umask(previous)
    assert lib is not None and lib.lemmse_probe() == 42
    for path in [tmp_path / "made", cache, *cache.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        allowed = (0o700,) if path.is_dir() else (0o600, 0o700)
        assert mode in allowed, f"{path} has mode {oct(mode)}"


SCENARIOS = ["shared directory, mode 1777", "group-writable directory", "directory of another user",
             "library of another user", "library writable by others", "content differs from its digest"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_planted_library_never_runs(tmp_path, scenario):
    """A library with a constructor, planted under the name the cache would load, never runs: it is in a
    directory that others can write or that is not ours, is not ours, is writable by others, or does not
    match the digest recorded when the library was built.  The probe still works (built privately, or the
    entry rebuilt), with at most one warning for both probes, and nothing of another user is deleted."""
    real, shared, marker = tmp_path / "real", tmp_path / "shared", tmp_path / "marker"
    assert compiled.compile_library(CC, str(real), "probe", PROBE, SIGNATURES) is not None
    planted = build_shared_object(tmp_path / "planted.so", PLANTED % json.dumps(str(marker)))
    shutil.copytree(real, shared)
    (target,) = libraries(shared)
    target.write_bytes(planted)
    if scenario != "content differs from its digest":
        for sidecar in sidecars(target):  # an attacker who can write here can also record the right digest
            sidecar.write_text(sha256(planted) + "\n")
    foreign = scenario in ("shared directory, mode 1777", "group-writable directory", "directory of another user",
                           "library of another user")
    if scenario == "shared directory, mode 1777":
        shared.chmod(0o1777)
    elif scenario == "group-writable directory":
        shared.chmod(0o770)
    elif scenario == "directory of another user":
        os.chown(shared, OTHER_UID, OTHER_UID)
    elif scenario == "library of another user":
        for path in shared.rglob("*"):
            os.chown(path, OTHER_UID, OTHER_UID)
    elif scenario == "library writable by others":
        target.chmod(0o777)
    run = run_python(LOAD_PROBES, shared, tmp_path / "tmp")
    assert run.returncode == 0, run.stderr
    assert not marker.exists(), "the planted library was loaded"
    result = json.loads(run.stdout)
    assert result["values"] == [42, 42]
    if foreign:
        assert len(result["warnings"]) == 1 and str(shared) in result["warnings"][0], result["warnings"]
        assert target.read_bytes() == planted  # not ours to delete or repair
    else:  # our own private entry, damaged: rebuilt in place, silently
        assert result["warnings"] == []
        (repaired,) = [p for p in libraries(shared) if p.parent == target.parent]
        assert repaired.read_bytes() != planted
        assert stat.S_IMODE(repaired.stat().st_mode) & 0o022 == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # a private build place is removed after loading


# --- item 3: a damaged cache is repaired ---------------------------------------------------------------------

ESTIMATE = """
import json, sys, warnings
import numpy as np, torch
import lemmse_ray as lm
from lemmse_ray.kernels import epilogue
g = torch.Generator().manual_seed(0)
train = torch.rand(9, 1, 12, 12, generator=g, dtype=torch.float64)
x = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
problem = lm.Denoising()
_, z, _ = problem.measure(x, 0.1, torch.Generator().manual_seed(1))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = [lm.estimate(train, z, problem, sigma=0.1, patch_size=3, stats=("variance", "ess"), kernel=kernel)
            for kernel in ("auto", "torch")]
np.save(sys.argv[1], np.stack([np.concatenate([r.mean.numpy().ravel(), r.variance.numpy().ravel(),
                                               r.ess.numpy().ravel()]) for r in runs]))
print(json.dumps({"sliding": runs[0].info["sliding_class"] is not None, "epilogue": epilogue.load() is not None,
                  "warnings": [str(w.message) for w in caught if str(w.message).startswith("lemmse_ray")]}))
"""


def estimate_in_subprocess(cache: Path, tmp: Path, name: str, env: dict | None = None):
    out = tmp / f"{name}.npy"
    run = run_python(ESTIMATE.replace("sys.argv[1]", repr(str(out))), cache, tmp / f"{name}-tmp", env)
    return run, (np.load(out, allow_pickle=False) if out.exists() else None)


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    """A cache built by one estimate (both libraries: the sliding kernel and the epilogue), and its numbers."""
    tmp = tmp_path_factory.mktemp("good")
    run, numbers = estimate_in_subprocess(tmp / "cache", tmp, "baseline")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info == {"sliding": True, "epilogue": True, "warnings": []}
    assert {p.name.split("-")[0].split(".")[0] for p in libraries(tmp / "cache")} >= {"sliding", "epilogue"}
    return tmp / "cache", numbers


@pytest.mark.parametrize("damage", ["truncated to 8 KB", "truncated to 1 KB", "valid library without the symbol"])
def test_damaged_library_is_rebuilt(tmp_path, good_cache, damage):
    """A truncated library (SIGBUS when loaded) is caught by its digest before it is loaded, a library without
    the expected symbol when it is; either is rebuilt once, silently, with the numbers of an untouched cache."""
    source, baseline = good_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    originals = {p: p.read_bytes() for p in libraries(cache)}
    if damage.startswith("truncated"):
        size = 8192 if "8 KB" in damage else 1024
        for path in originals:
            os.truncate(path, size)
    else:
        (path,) = [p for p in originals if "sliding" in str(p.relative_to(cache))]
        other = build_shared_object(tmp_path / "other.so", "int lemmse_unrelated(void) { return 0; }\n")
        path.write_bytes(other)
        for sidecar in sidecars(path):
            sidecar.write_text(sha256(other) + "\n")
    run, numbers = estimate_in_subprocess(cache, tmp_path, "damaged")
    assert run.returncode == 0, f"returncode {run.returncode}: {run.stderr[-2000:]}"
    assert json.loads(run.stdout) == {"sliding": True, "epilogue": True, "warnings": []}
    assert np.array_equal(numbers, baseline)
    for path in libraries(cache):  # repaired: full libraries, each matching its recorded digest
        data = path.read_bytes()
        assert len(data) == len(originals[path])
        assert [s.read_text().split()[0] for s in sidecars(path)] == [sha256(data)]


def test_persistent_failure_falls_back_to_torch_with_one_warning(tmp_path):
    """A compiler whose libraries never hold the symbol: each process builds (or, finding the entry damaged,
    rebuilds) each library once, then uses torch with one warning each; ``kernel="auto"`` then gives the
    numbers of ``kernel="torch"``."""
    log = tmp_path / "invocations"
    fake = tmp_path / "fake-cc"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {log}
out=""; previous=""
for arg in "$@"; do [ "$previous" = "-o" ] && out="$arg"; previous="$arg"; done
echo "int lemmse_unrelated(void) {{ return 0; }}" > "$out.c"
exec {CC} -shared -fPIC "$out.c" -o "$out"
""")
    fake.chmod(0o700)
    for process in (1, 2):  # the first builds each library; the second finds it damaged and rebuilds it once
        run, numbers = estimate_in_subprocess(tmp_path / "cache", tmp_path, f"broken{process}", {"CC": str(fake)})
        assert run.returncode == 0, run.stderr[-2000:]
        info = json.loads(run.stdout)
        assert info["sliding"] is False and info["epilogue"] is False
        assert len(info["warnings"]) == 2, info["warnings"]
        assert sum("sliding" in w for w in info["warnings"]) == 1
        assert sum("epilogue" in w for w in info["warnings"]) == 1
        assert np.array_equal(numbers[0], numbers[1])
        assert len(log.read_text().splitlines()) == 2 * process  # one build of each library per process


def test_only_the_entry_found_damaged_is_discarded(tmp_path):
    """Concurrent processes (Ray workers) may find the same entry damaged: one discards and rebuilds it, and a
    slower one must then not discard the entry just installed, only the very one (device, inode) it found."""
    cache = tmp_path / "cache"
    assert compiled.compile_library(CC, str(cache), "probe", PROBE, SIGNATURES) is not None
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("probe-")]
    other = tmp_path / "other"
    other.mkdir()
    directory = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found_earlier = (other.stat().st_dev, other.stat().st_ino)  # not the entry there now
        compiled._discard(directory, str(cache), entry.name, found_earlier)
        assert entry.exists()
        compiled._discard(directory, str(cache), entry.name, (entry.stat().st_dev, entry.stat().st_ino))
        assert not entry.exists() and list(cache.iterdir()) == []
    finally:
        os.close(directory)


def test_compile_library_without_the_symbol_returns_none(tmp_path):
    with pytest.warns(UserWarning, match="lemmse_absent") as caught:
        assert compiled.compile_library(CC, str(tmp_path / "cache"), "absent", PROBE,
                                        {"lemmse_absent": ([], ctypes.c_int)}) is None
    assert len([w for w in caught if str(w.message).startswith("lemmse_ray")]) == 1


# --- item 13: an interrupted build ---------------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited: only its parent's wait is missing


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_build_leaves_no_compiler_and_no_temporary_directory(tmp_path, signum):
    """A build killed mid-compile (a fake compiler that sleeps) takes its compiler with it and removes its
    temporary directory; the next build leaves no temporary directory either."""
    cache, pids = tmp_path / "cache", tmp_path / "pids"
    fake = tmp_path / "slow-cc"
    fake.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    fake.chmod(0o700)
    code = ("import ctypes, signal\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from lemmse_ray.kernels import compiled\n"
            f"compiled.compile_library(compiled.compiler(), {str(cache)!r}, 'probe', {PROBE!r}, "
            "{'lemmse_probe': ([], ctypes.c_int)})\n")
    env = {**os.environ, "LEMMSE_RAY_CACHE": str(cache), "CC": str(fake)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    started: list[int] = []
    try:
        ok = wait_for(lambda: proc.poll() is not None or (pids.exists() and len(pids.read_text().split()) == 2),
                      300)
        assert ok and proc.poll() is None, f"the fake compiler never started: {proc.communicate()}"
        started = [int(p) for p in pids.read_text().split()]
        assert [p for p in cache.iterdir() if p.is_dir()], "no build directory while compiling"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signum, err[-2000:]
        assert wait_for(lambda: not any(alive(pid) for pid in started), 30), \
            f"compiler processes still running: {[pid for pid in started if alive(pid)]}"
        assert [p.name for p in cache.iterdir()] == [], "the interrupted build left files behind"
    finally:
        for pid in started:  # only the fake compiler's own processes, by id, should the test fail
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert compiled.compile_library(CC, str(cache), "probe", PROBE, SIGNATURES).lemmse_probe() == 42
    assert [p.name for p in cache.iterdir() if not p.name.startswith("probe")] == []


def test_stale_build_directories_are_removed_at_the_next_build(tmp_path):
    """Build directories of this project (their names) older than the longest build are removed when a library
    is next built there; young ones (a build in progress) and any other name stay."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old = time.time() - 3600
    names = {"lemmse_ray-build-ab12cd_3": True, "lemmse_ray-build-young000": False, "tmpab12cd_3": False,
             "lemmse_ray-build-notmine0": False, "lemmse_ray-build-ab12cd_34": False}
    for name in names:
        (cache / name).mkdir()
        (cache / name / "probe.c").write_text(PROBE)
        if name != "lemmse_ray-build-young000":
            os.utime(cache / name, (old, old))
    os.chown(cache / "lemmse_ray-build-notmine0", OTHER_UID, OTHER_UID)
    os.utime(cache / "lemmse_ray-build-notmine0", (old, old))
    assert compiled.compile_library(CC, str(cache), "probe", PROBE, SIGNATURES).lemmse_probe() == 42
    for name, removed in names.items():
        assert (cache / name).exists() != removed, name
