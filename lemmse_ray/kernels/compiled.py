"""Compiling and caching the package's C libraries (the fused epilogue, the sliding-window kernel).

:func:`compile_library` builds a C source with the system C compiler (``$CC``, else ``cc``/``gcc``) and
OpenMP — which resolves to the OpenMP runtime torch has already loaded, so both share one thread pool — and
caches the library under :func:`cache_dir`, keyed by the source, the flags, the compiler and the CPU.  Where
no compiler is found, the build fails, or ``LEMMSE_RAY_FUSED=0`` (:func:`enabled`), the callers fall back to
the pure-torch path.

Loading a library runs its code in the process (its constructors first), often as a user with more rights
than whoever could write the file, and a damaged library can kill the process (a truncated one with SIGBUS
when it is mapped).  So the cache is private and every library is checked before it is loaded:

* **Private.**  The directories the cache creates are 0700, its libraries 0700 and other files 0600, set
  explicitly whatever the umask.
* **One entry, written at once.**  A library is the directory ``<name>-<key>/`` holding ``<name>.so`` and
  ``<name>.sha256``, the SHA-256 of the library recorded when it was built.  Both are written in a temporary
  build directory that is then renamed into place, so the pair appears at once; of concurrent builders (Ray
  workers) the first rename wins and the others load the winner's entry.
* **Checked before loading.**  The cache directory, the entry, the digest file and the library are opened
  one inside the other (no symbolic link followed below the cache directory), and each must be owned by the
  current user and writable by no one else; the library's bytes, read through the descriptor that is then
  loaded (``/proc/self/fd/N``, so no file swapped in between can be loaded), must match the digest.
* **Foreign places are never used.**  A cache directory that fails these checks (another owner, writable by
  group or others — e.g. a shared directory of mode 1777) or an entry of another user is never loaded and
  never touched: one warning per place and process, and the library is built in a fresh private temporary
  directory, loaded, and that directory removed.
* **Damage is repaired once.**  An entry of this user that fails a check (no digest, a digest that does not
  match — a truncated library —, loosened permissions) or whose library fails to load or lacks a symbol is
  discarded and rebuilt, silently; if the library just built fails as well, :func:`compile_library` warns once
  and returns None, and the caller uses the pure-torch path.  A process compiles each library at most once.
* **Interrupted builds clean up.**  The compiler runs in its own process group, killed whole (the compiler
  driver and the programs it started) when the build ends by an exception: a timeout, Ctrl-C
  (KeyboardInterrupt), or SIGTERM, which during a build in the main thread is turned into an exception and,
  once the compiler is killed and the build directory removed, delivered again to the handler it replaced
  (the default one ends the process).  Build directories are named ``lemmse_ray-build-XXXXXXXX``; those of
  this user older than :data:`STALE_SECONDS` (left by a process killed outright, SIGKILL) are removed at the
  next build in the same directory.  No other name is ever removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
BUILD_PREFIX = "lemmse_ray-build-"
#: a build directory's name: the prefix and the 8 characters of :func:`tempfile.mkdtemp` (or of a discarded entry)
BUILD_NAME = re.compile(re.escape(BUILD_PREFIX) + r"[a-z0-9_]{8}")
COMPILE_TIMEOUT = 120
#: a build directory untouched this long (seconds) belongs to no running build: builds time out well before
STALE_SECONDS = 900
MAX_LIBRARY_BYTES = 1 << 26

#: places already warned about in this process (a foreign cache is reported once, not once per library)
_WARNED: set[str] = set()
#: descriptors of the loaded libraries, kept open for the life of the process: the dynamic loader recognises
#: an already loaded library by its name, so no ``/proc/self/fd/N`` name may be reused by another library
_HELD: list[int] = []


class _Refused(Exception):
    """A cached library that must not be loaded; the message says why."""


class _Untrusted(_Refused):
    """A place or file that is another user's, or a cache directory others can write: never loaded, never
    touched."""


class _Damaged(_Refused):
    """An entry of this user that fails a check or does not work: discarded and rebuilt.  ``identity``: the
    entry's (device, inode) when it was found, so that only that entry is discarded, never one that another
    process has installed since."""

    identity: tuple[int, int] | None = None


class _Terminated(BaseException):
    """SIGTERM during a build, raised so that the build cleans up before the process ends."""


def _cpu_key() -> str:
    """What the compiled code depends on besides source and flags: architecture and CPU features."""
    key = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return key + next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:  # no /proc/cpuinfo (not Linux): the architecture alone names the build
        return key


def compiler() -> str | None:
    """The C compiler used: ``$CC`` if set, else ``cc`` or ``gcc`` on PATH (None: none found)."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def compile_library(cc: str | None, cache_dir: str, name: str, source: str,
                    signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL | None:
    """Compile (or reuse) the C library ``source`` with ``cc`` in ``cache_dir`` (entry ``name-<key>/``, see the
    module docstring) and set the ``argtypes`` and ``restype`` of its functions from ``signatures`` (symbol →
    (argtypes, restype)); None (with one warning) if that is impossible."""
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([source, *FLAGS, _cpu_key(), cc]).encode()).hexdigest()[:16]
    entry = f"{name}-{key}"
    try:
        with _terminate_as_exception():
            return _cached(cc, os.path.abspath(cache_dir), entry, name, source, signatures)
    except (OSError, subprocess.SubprocessError, _Refused) as err:
        detail = getattr(err, "stderr", b"") or b""
        warnings.warn(f"lemmse_ray: the compiled {name} is unavailable ({err}; "
                      f"{detail.decode(errors='replace')[:300]}); using the pure-torch path", stacklevel=3)
        return None


def _cached(cc: str, cache_dir: str, entry: str, name: str, source: str,
            signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL:
    """The library of ``entry`` in ``cache_dir``: loaded if it passes the checks, else built (once)."""
    try:
        directory = _private_directory(cache_dir)
    except _Refused as err:
        _warn_once(cache_dir, err)
        return _private_build(cc, entry, name, source, signatures)
    try:
        try:
            return _load(directory, cache_dir, entry, name, signatures)
        except FileNotFoundError:  # not built yet
            pass
        except _Untrusted as err:
            _warn_once(os.path.join(cache_dir, entry), err)
            return _private_build(cc, entry, name, source, signatures)
        except _Damaged as err:
            _discard(directory, cache_dir, entry, err.identity)
        _build(cc, cache_dir, entry, name, source)
        return _load(directory, cache_dir, entry, name, signatures)
    finally:
        os.close(directory)


def _warn_once(place: str, err: Exception) -> None:
    if place not in _WARNED:
        _WARNED.add(place)
        warnings.warn(f"lemmse_ray: {err}: its libraries are never loaded; building them in a private temporary "
                      "directory instead (make LEMMSE_RAY_CACHE a directory of this user that no one else can "
                      "write)", stacklevel=5)


def _private_directory(path: str) -> int:
    """An open descriptor of the cache directory ``path``, created (0700, missing parents too) if absent; it
    must be this user's and writable by no one else (_Untrusted otherwise).  ``path`` itself may be a link."""
    missing, head = [], path
    while not os.path.lexists(head) and os.path.dirname(head) != head:
        missing.append(head)
        head = os.path.dirname(head)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another process: checked below like any existing one
            continue
        except OSError as err:
            raise _Untrusted(f"the library cache {path} cannot be created ({err.strerror})") from None
        # the umask may have removed bits of 0o700 (never added any); through a descriptor, so that a link put in
        # its place meanwhile (in a parent others can write) is not followed
        try:
            made = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise _Untrusted(f"the library cache {path} cannot be created ({err.strerror})") from None
        try:
            os.fchmod(made, 0o700)
        finally:
            os.close(made)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise _Untrusted(f"the library cache {path} cannot be opened ({err.strerror})") from None
    try:
        _inspect(os.fstat(fd), f"the library cache {path}", directory=True)
    except _Refused as err:
        os.close(fd)
        raise _Untrusted(str(err)) from None
    return fd


def _inspect(st: os.stat_result, what: str, directory: bool) -> None:
    """_Untrusted unless ``st`` is this user's; _Damaged unless it is a directory (``directory``) or a regular
    file, writable by no one else."""
    if st.st_uid != os.geteuid():
        raise _Untrusted(f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if directory != stat.S_ISDIR(st.st_mode) or not (directory or stat.S_ISREG(st.st_mode)):
        raise _Damaged(f"{what} is not a {'directory' if directory else 'regular file'}")
    if st.st_mode & 0o022:
        raise _Damaged(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _open(name: str, dir_fd: int, what: str, directory: bool) -> int:
    """Open ``name`` inside ``dir_fd`` without following a link (non-blocking: a FIFO planted there does not
    hang the process) and :func:`_inspect` it; FileNotFoundError where it is absent."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as err:  # a link (ELOOP) or, for a directory, not one (ENOTDIR): whose is it?
        _inspect(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), what, directory)
        raise _Damaged(f"{what} cannot be opened ({err.strerror})") from None
    try:
        _inspect(os.fstat(fd), what, directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _load(directory: int, cache_dir: str, entry: str, name: str,
          signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL:
    """Load the library of ``entry`` once it passes every check of the module docstring (FileNotFoundError:
    no entry; _Untrusted: another user's; _Damaged: ours but unusable) and set its signatures."""
    found = os.stat(entry, dir_fd=directory, follow_symlinks=False)
    try:
        return _load_entry(directory, cache_dir, entry, name, signatures)
    except _Damaged as err:
        err.identity = (found.st_dev, found.st_ino)
        raise


def _load_entry(directory: int, cache_dir: str, entry: str, name: str,
                signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL:
    path = os.path.join(cache_dir, entry)
    library = os.path.join(path, f"{name}.so")
    with contextlib.ExitStack() as opened:
        entry_fd = _open(entry, directory, f"the library entry {path}", directory=True)
        opened.callback(os.close, entry_fd)
        try:
            digest_fd = _open(f"{name}.sha256", entry_fd, f"the digest of {library}", directory=False)
            opened.callback(os.close, digest_fd)
            lib_fd = _open(f"{name}.so", entry_fd, f"the library {library}", directory=False)
        except FileNotFoundError as err:
            raise _Damaged(f"{path} is incomplete ({err.filename} is missing)") from None
        try:
            recorded = os.read(digest_fd, 256).decode("ascii", errors="replace").strip()
            if _digest(lib_fd, library) != recorded:
                raise _Damaged(f"{library} does not match the digest recorded when it was built")
            proc = f"/proc/self/fd/{lib_fd}"
            try:  # where there is no /proc (not Linux) the file is loaded by its name, checked just before
                lib = ctypes.CDLL(proc if os.path.exists(proc) else library)
            except OSError as err:
                raise _Damaged(f"{library} does not load ({err})") from None
        except BaseException:
            os.close(lib_fd)
            raise
    _HELD.append(lib_fd)
    for symbol, (argtypes, restype) in signatures.items():
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise _Damaged(f"{library} lacks the symbol {symbol}") from None
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _digest(fd: int, library: str) -> str:
    """The SHA-256 (hex) of the file open as ``fd``, read to its end (at most :data:`MAX_LIBRARY_BYTES`)."""
    digest, size = hashlib.sha256(), 0
    while chunk := os.read(fd, 1 << 20):
        size += len(chunk)
        if size > MAX_LIBRARY_BYTES:
            raise _Damaged(f"{library} is larger than {MAX_LIBRARY_BYTES} bytes")
        digest.update(chunk)
    return digest.hexdigest()


def _discard(directory: int, cache_dir: str, entry: str, identity: tuple[int, int] | None) -> None:
    """Remove this user's damaged ``entry``, if it is still the one found damaged (``identity``): renamed first
    to a build directory's name (so that a process killed meanwhile leaves a stale build directory, removed
    later), then deleted.  An entry another process has discarded or installed meanwhile is left alone."""
    trash = BUILD_PREFIX + secrets.token_hex(4)
    try:
        st = os.stat(entry, dir_fd=directory, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != identity:
            return
        os.rename(entry, trash, src_dir_fd=directory, dst_dir_fd=directory)
    except FileNotFoundError:
        return
    path = os.path.join(cache_dir, trash)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _build(cc: str, parent: str, entry: str, name: str, source: str) -> None:
    """Compile ``source`` into the entry ``parent/entry``: in a private build directory (0700), the library
    (0700), its digest and source (0600), then the directory renamed into place.  Stale build directories of
    ``parent`` are removed first; this build's is removed on every way out but SIGKILL."""
    _remove_stale(parent)
    build = tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=parent)
    try:
        src = os.path.join(build, f"{name}.c")
        _write(src, source.encode(), 0o600)
        out = os.path.join(build, f"{name}.so")
        _run_compiler([cc, *FLAGS, src, "-o", out, "-lm"])
        os.chmod(out, 0o700)
        with open(out, "rb") as f:
            _write(os.path.join(build, f"{name}.sha256"), (hashlib.sha256(f.read()).hexdigest() + "\n").encode(),
                   0o600)
        try:
            os.rename(build, os.path.join(parent, entry))
            build = None
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # else another process installed the entry first: the caller loads (and checks) that one
    finally:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)


def _private_build(cc: str, entry: str, name: str, source: str,
                   signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL:
    """Build and load the library in a fresh private temporary directory, removed once it is loaded (the
    loaded library needs no file)."""
    _remove_stale(tempfile.gettempdir())
    place = tempfile.mkdtemp(prefix=BUILD_PREFIX)
    try:
        _build(cc, place, entry, name, source)
        directory = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _load(directory, place, entry, name, signatures)
        finally:
            os.close(directory)
    finally:
        shutil.rmtree(place, ignore_errors=True)


def _write(path: str, data: bytes, mode: int) -> None:
    """Create the new file ``path`` with exactly ``mode`` (whatever the umask) and ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, mode)
        f.write(data)


def _remove_stale(directory: str) -> None:
    """Remove the build directories (:data:`BUILD_NAME`) of this user in ``directory`` untouched for
    :data:`STALE_SECONDS`: left by a killed process, as no build runs that long."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for item in entries:
        if not BUILD_NAME.fullmatch(item.name):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and now - st.st_mtime > STALE_SECONDS:
            shutil.rmtree(item.path, ignore_errors=True)


def _run_compiler(command: list[str]) -> None:
    """Run the compiler in its own process group (a session), killed whole with everything it started if
    this process stops waiting for it by any exception; CalledProcessError if it fails."""
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        try:
            _, err = proc.communicate(timeout=COMPILE_TIMEOUT)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command, stderr=err)


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """During the block, SIGTERM raises :class:`_Terminated` so that the build's cleanup runs; then the signal
    is sent again to the handler it replaced (the default one ends the process; if a Python handler returns,
    the build counts as failed).  Only in the main thread (the only one that may set handlers) and where
    SIGTERM is handled at all (not ignored, nor set outside Python)."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise subprocess.SubprocessError("the build was interrupted by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def cache_dir() -> str:
    """Where compiled libraries are cached: ``$LEMMSE_RAY_CACHE``, default ``~/.cache/lemmse_ray``."""
    return os.environ.get("LEMMSE_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lemmse_ray")


def enabled() -> bool:
    """Compiled kernels are used unless ``LEMMSE_RAY_FUSED=0``."""
    return os.environ.get("LEMMSE_RAY_FUSED", "1") != "0"
