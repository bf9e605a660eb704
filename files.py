"""Files: written atomically (temporary name, then rename), a run folder's lock, and checkpoints read and
written so that an interrupted or damaged one is refused in one line, never loaded wrong; PNG and MATLAB
files read the same way (checked whole before use)."""
import io
import json
import os
import socket
import struct
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils import UserError


def atomic_write(path, write_fn, mode="wb"):
    """Write through a temp file in the same folder, then rename: readers see the old file or the new one.
    A failed write (folder not writable, disk full) is a UserError; the old file stays as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the result should look like any other output
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: could not be written ({e.strerror or e}); any previous version is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def ensure_writable(folder):
    """Create the run directory and prove it takes files, before any work is spent."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror}); choose another --out") from None


def check_new_run(out, resume):
    """A training run writes into OUT only if OUT holds no run, or to continue the one there (--resume): a run is
    never overwritten. Its files: args.json, metrics.csv, checkpoints (args.json alone: a run that ended before
    its first save, which --resume starts again)."""
    out = Path(out)
    held = sorted(p.name for p in out.glob("*") if p.name in ("args.json", "metrics.csv") or p.suffix == ".pt")
    continuing = resume == "last" or resume and Path(resume).resolve().parent == out.resolve()
    if held and not continuing:
        raise UserError(f"{out}: holds a run already ({', '.join(held)}); continue it with --resume, or start this one "
                        "in another --out")
    if resume == "last" and set(held) - {"args.json"} and "last.pt" not in held:
        raise UserError(f"{out}: holds a run without its last.pt ({', '.join(held)}): --resume has nothing to "
                        "continue from; start this one in another --out")


class RunLock:
    """OUT/.lock while a training run writes into OUT: its process id, host and start time. A second run into
    the same folder is refused in one line naming the first; a lock whose process is gone (on this host) is
    taken over with a warning. Reading a run (evaluate.py, visualize.py) needs no lock."""

    def __init__(self, folder, active=True):
        self.path, self.active, self.mine = Path(folder) / ".lock", active, False

    def __enter__(self):
        if not self.active:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while not self.mine:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text())
                except (OSError, ValueError):  # being written this very moment, or damaged
                    held = {}
                pid, host, started = (held.get(k, "?") for k in ("pid", "host", "started"))
                # on this host, a process that is gone (or is this one: pids are reused) holds nothing
                if host == me["host"] and (pid == me["pid"] or not process_alive(pid)):
                    print(f"warning: {self.path}: taking over the lock of a run that is gone (pid {pid}, started "
                          f"{started})", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(f"{self.path.parent}: another run is writing there (pid {pid} on {host}, started "
                                f"{started}); let it finish or choose another --out (if it ran on another machine "
                                f"and is gone, delete {self.path})") from None
            except OSError as e:
                raise UserError(f"{self.path}: could not be written ({e.strerror or e}); choose another --out") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.mine = True
        return self

    def __exit__(self, *exc):
        if self.mine:
            self.path.unlink(missing_ok=True)
            self.mine = False


def process_alive(pid):
    """Whether a process with this id runs on this machine (a zombie, ended but not yet reaped by its
    parent, does not)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # another user's
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS)
        return True


class _KeepsWriteErrors:
    """A file whose failed writes are remembered: torch.save turns them into an internal message ("unexpected
    pos ..."), where the user needs the system's ("No space left on device", "File too large")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save_checkpoint(path, state):
    kept = []

    def write(f):
        kept.append(_KeepsWriteErrors(f))
        torch.save(state, kept[0])
    try:
        atomic_write(path, write)
    except RuntimeError as e:
        error = kept and kept[0].error
        reason = (error.strerror or str(error)) if error else str(e).splitlines()[0][:100]
        raise UserError(f"{path}: could not be written ({reason}); the previous checkpoint is intact: free some "
                        "space and --resume") from None


def read_checkpoint(path):
    """torch.load with weights_only=True (nothing in the file can run code), each failure in one line. The
    file is checked whole first: torch.load does not compare the zip's checksums, so a flipped bit among the
    weights would load as another weight, silently."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: checkpoint is empty (an interrupted copy?); use another one")
    if zipfile.is_zipfile(path):  # every checkpoint torch writes; a truncated one is not, and fails below
        try:
            with zipfile.ZipFile(path) as z:
                # torch.serialization.set_crc32_options(False) writes no checksums (0 everywhere): none to check
                damaged = z.testzip() if any(i.CRC for i in z.infolist()) else None
                if damaged:
                    damaged = f"{damaged} fails its checksum"
        except Exception as e:  # a damaged zip directory fails in many ways (BadZipFile, EOFError, zlib.error...)
            damaged = f"its zip directory is unreadable ({str(e)[:80]})"
        if damaged:
            raise UserError(f"{path}: damaged checkpoint: {damaged}; use another copy")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path}: checkpoint holds pickled code or objects, which are never loaded; "
                            "use a checkpoint written by this project") from None
        reason = str(e).splitlines()[0].split(". ")[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint ({reason}); it may be truncated: use another one") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise UserError(f"{path}: its 'model' entry is not a state dict of tensors; use another checkpoint")
    for key in ("config", "args", "extra"):
        if not isinstance(ckpt.get(key, {}), dict):
            raise UserError(f"{path}: its {key!r} entry is not a dict: damaged; use another checkpoint")
    return ckpt


# ----------------------------------------------------------------------------- PNG and MATLAB files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# far above any frame of the datasets (2048x1024): a header that declares more is damage or a decompression bomb
MAX_PIXELS = 40_000_000


def png_damage(data):
    """What is wrong with a PNG's bytes ('' if nothing): every chunk's CRC is checked. Pillow checks only the
    header's, and zlib's own checksum comes after the last pixel row, which Pillow stops short of: a flipped
    bit among the pixel data would otherwise decode into other values, silently."""
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", view[end - 4:end])[0]:
            return f"its {kind.decode('latin-1')!r} chunk fails its checksum: damaged"
        if kind == b"IEND":
            return ""
        pos = end
    return "it ends before its last chunk: truncated"


def open_png(path):
    """The decoded image at path. PNGs (all the datasets hold) are checked whole first; other formats that
    Pillow reads (visualize.py --images) are decoded as they are."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        damage = png_damage(data) if data.startswith(PNG_SIGNATURE) else ""
        if damage:
            raise OSError(damage)
        with warnings.catch_warnings():  # Pillow warns of large images: refused just below in one line instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_PIXELS:
            raise OSError(f"it declares {im.width}x{im.height} pixels, more than {MAX_PIXELS:,}: a decompression "
                          "bomb or a damaged header")
        im.load()  # decode now, so a truncated file fails here and not inside a DataLoader worker
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: unreadable image ({e}); re-extract the dataset or remove this file") from None
    return im


def read_mat_vectors(path):
    """The numeric arrays of a MATLAB v5 .mat file (GTA-V's split.mat), without scipy."""
    data = Path(path).read_bytes()
    if len(data) < 128 or not data[:10].startswith(b"MATLAB 5.0"):
        raise UserError(f"{path}: not a MATLAB v5 .mat file; use the split.mat that ships with GTA-V")
    dtypes = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}

    def elements(buf):
        pos = 0
        while pos + 8 <= len(buf):
            typ, size = struct.unpack_from("<II", buf, pos)
            if typ >> 16:  # small element: size and type packed in the first 4 bytes
                yield typ & 0xFFFF, buf[pos + 4:pos + 4 + (typ >> 16)]
                pos += 8
            else:
                yield typ, buf[pos + 8:pos + 8 + size]
                pos += 8 + size + (0 if typ == 15 else -size % 8)  # compressed elements are not padded

    out = {}

    def walk(buf):
        for typ, body in elements(buf):
            if typ == 15:  # miCOMPRESSED
                walk(zlib.decompress(body))
            elif typ == 14:  # miMATRIX: flags, dims, name, real part
                parts = list(elements(body))
                if len(parts) >= 4 and parts[3][0] in dtypes:
                    name = parts[2][1].decode("ascii", "replace")
                    out[name] = np.frombuffer(parts[3][1], dtypes[parts[3][0]]).ravel()

    try:
        walk(data[128:])
    except (zlib.error, struct.error, ValueError) as e:
        raise UserError(f"{path}: damaged .mat file ({e})") from None
    return out


def write_mat_vectors(path, arrays):
    """Write column vectors of doubles as an uncompressed MATLAB v5 file (as GTA-V's split.mat holds)."""
    def element(typ, payload):
        return struct.pack("<II", typ, len(payload)) + payload + b"\0" * (-len(payload) % 8)

    body = b""
    for name, values in arrays.items():
        values = np.asarray(values, "<f8")
        matrix = (element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
                  + element(5, struct.pack("<ii", len(values), 1))
                  + element(1, name.encode("ascii"))
                  + element(9, values.tobytes()))
        body += element(14, matrix)
    # the header text is the one the toy pair has always had: same seed, same bytes
    header = b"MATLAB 5.0 MAT-file, written by datasets.py".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    Path(path).write_bytes(header + body)
