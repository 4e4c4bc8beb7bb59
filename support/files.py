"""Outputs: checked by creating them before any work, written atomically after it, and never lost."""
import os
import tempfile

import torch

from support.harness import BadInput


def output_problem(path, flag="--output"):
    """What would stop a file from being written at `path` (a message), or None. It tries: creates the file
    (and any missing folders) and removes what it created again, so a folder that refuses new files (a
    read-only mount, /proc) is found before the run, not after it. An existing file is opened for appending,
    which changes nothing."""
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name"
    made, folder = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        if os.path.exists(path):
            with open(path, "ab"):
                return None
        try:
            for new in reversed(made):
                os.mkdir(new)
            with open(path, "xb"):
                pass
            os.remove(path)
        finally:
            for new in made:          # deepest first
                if os.path.isdir(new):
                    os.rmdir(new)
    except OSError as e:
        return f"{flag} {path}: cannot create a file under {folder} ({e.strerror or type(e).__name__})"
    return None


unfinished = set()          # files being written now, removed if the run is interrupted
on_interrupt = []           # callables run if the run is interrupted; each returns a note for the stop's line


def remove_unfinished():
    for path in list(unfinished):
        try:
            os.remove(path)
        except OSError:
            pass


def save(obj, path, flag="--output"):
    """torch.save atomically (a temporary file renamed over `path`); a special file (/dev/null, a pipe) is
    written directly, since a rename would replace it. If writing fails after all (a full disk), the object
    goes to a file in the system's temporary folder instead, and BadInput says where (or that it is lost)."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            torch.save(obj, path)
            return path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        unfinished.add(tmp)
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
            unfinished.discard(tmp)
        return path
    except OSError as e:
        reason = e.strerror or type(e).__name__
    try:
        fd, kept = tempfile.mkstemp(prefix="sp_self_forcing_", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        where = f"kept in {kept} instead"
    except OSError as e:
        where = f"and could not be kept elsewhere either ({e.strerror or type(e).__name__})"
    raise BadInput(f"{flag} {path}: writing failed after the run ({reason}); the result is {where}")
