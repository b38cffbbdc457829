"""Turn the two Omniglot zips into one array: data/omniglot.npy.

Omniglot (Lake et al., 2015) holds 1623 handwritten characters from 50 alphabets, each drawn once by 20
different people, as 105x105 black-on-white PNGs. It ships as two zips:

    images_background.zip   30 alphabets, 964 characters
    images_evaluation.zip   20 alphabets, 659 characters

each laid out as  images_background/<Alphabet>/characterNN/NNNN_NN.png.  Every MAML run needs all of them
at 28x28, so this script decodes them once and saves a single float32 array:

    data/omniglot.npy    shape (1623, 20, 1, 28, 28) = (character, drawing, channel, row, column)
    data/omniglot.json   the sidecar: the size and sha256 of the exact bytes of omniglot.npy, class names in
                         array order, each zip's size and md5, the resize method and the package versions used

Order (never the order of a zip listing or of os.walk): background characters, then evaluation characters;
within each zip sorted by alphabet folder name, then character folder name; the 20 drawings of a character
sorted by file name. The sidecar's "classes" list follows that order.

Pixel values: 1.0 = pen stroke, 0.0 = background. The PNGs draw black strokes on white, so we invert them
(1 - pixel), as the MAML reference code (cbfinn/maml) does.

Resize: the PNGs are 1-bit images (Pillow mode "1"). The reference code resized them with Pillow's LANCZOS
filter, but Pillow cannot filter a 1-bit image and silently falls back to nearest neighbour, so the
reference data, and the paper's numbers, are nearest-neighbour binary images. The default, --resize
nearest, reproduces that. --resize lanczos converts to 8-bit grey first, which gives a true antialiased
resize with values between 0 and 1.

A zip missing from --zips is downloaded from the official repository (github.com/brendenlake/omniglot,
folder python/) and checked against the official md5. Zips found locally are checked by structure instead
(alphabet, character and drawing counts): rebuilt zips holding the official drawings are fine.

What is guaranteed:
  - Every problem with the input or output stops the script with one line that names the file and the fix,
    and leaves nothing behind: no temporary file, no half-written output, no folder that it created. A bad
    flag or a bad --out (a folder, a name not ending in .npy) is refused before anything is written, with
    exit status 2; other errors exit 1. Ctrl-C stops it in the same way, with exit status 130; pressed
    while the pair is being written, it takes effect once both files are in place.
  - No two arrays share a sidecar: an array's sidecar is its name with .json in place of .npy
    (sidecar_path), and an array's name must end in .npy.
  - The pair is consistent or refused, even if the script is killed (kill -9, power cut) at any moment:
    each file goes to a temporary name beside it and is renamed into place (run_files.atomic_write), first
    the array, last the sidecar, which records the sha256 of the array's bytes. A pair whose array does not
    match its sidecar's checksum (killed between the renames, edited, damaged, or built before sidecars had
    checksums) is rebuilt by this script even without --force, and refused by load_omniglot, which training
    uses. A kill can leave a temporary file (omniglot.npy.*.tmp) behind, never a pair that is trusted.
  - Both files get the permissions that the umask gives a new file (0644 under the usual umask 022).

Usage: python preprocess_omniglot.py [--zips data/] [--out data/omniglot.npy] [--force] [--resize nearest|lanczos]
"""

import contextlib
import hashlib
import io
import json
import os
import platform
import signal
import stat
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections import defaultdict, namedtuple
from pathlib import Path

import numpy as np
import PIL
import tqdm
from PIL import Image

from run_files import RUN_DEFAULTS, Parser, RunFileError, atomic_write

DRAWINGS_PER_CHARACTER = 20
SOURCE_SIZE = (105, 105)
IMAGE_SIZE = 28
RESIZE_METHODS = ("nearest", "lanczos")
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


# What each zip must contain, in array order (background characters first), and the md5 of the official
# download; folder is the zip's top-level folder, and its file name without ".zip".
ZipSpec = namedtuple("ZipSpec", "folder alphabets characters md5")
ZIPS = (
    ZipSpec("images_background", alphabets=30, characters=964, md5="68d2efa1b9178cc56df9314c21c6e718"),
    ZipSpec("images_evaluation", alphabets=20, characters=659, md5="6b91aef0f799c5bb55b94e3f2daec811"),
)
CLASS_COUNT = sum(spec.characters for spec in ZIPS)  # 964 + 659 = 1623


class PreprocessError(Exception):
    """A problem with the input or the output that the user can fix; the message says how."""


@contextlib.contextmanager
def new_folders_removed_on_failure(*paths):
    """If the block raises (Ctrl-C included), remove the folders among paths and their parents that did not
    exist before it and are empty after it, innermost first."""
    new = {folder for path in paths for folder in (path, *path.parents) if not os.path.isdir(folder)}
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda folder: len(folder.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: it holds something worth keeping
                folder.rmdir()
        raise


def file_md5(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def download(url, destination, expected_md5):
    """Download url to destination with a progress bar; keep it only if its md5 matches."""
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".download.tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as file:
            total_bytes = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
        actual_md5 = file_md5(partial)
        if actual_md5 != expected_md5:
            raise PreprocessError(f"{url}: downloaded file has md5 {actual_md5}, expected {expected_md5}. The "
                                  f"download is damaged or the source changed; run again, or put the official zip "
                                  f"at {destination.resolve()} yourself.")
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def ensure_zips(zips_dir):
    """Return the paths of both zips in zips_dir, downloading any that are missing."""
    zips_dir = Path(zips_dir)
    paths = [zips_dir / f"{spec.folder}.zip" for spec in ZIPS]
    for spec, path in zip(ZIPS, paths):
        if path.exists():
            continue
        url = OFFICIAL_URL + path.name
        print(f"{path} not found: downloading {url}")
        try:
            zips_dir.mkdir(parents=True, exist_ok=True)
            download(url, path, spec.md5)
        except OSError as error:  # no network (urllib.error.URLError), timeout, disk full, ...
            wanted = " and ".join(str(p.resolve()) for p in paths)
            raise PreprocessError(f"could not download {path.name} from {url} ({error}). Without internet access, "
                                  f"put the two Omniglot zips here: {wanted} (from https://github.com/brendenlake/"
                                  f"omniglot/tree/master/python), then run again.") from error
    return paths


def decode_drawing(png_bytes, resize):
    """One 105x105 PNG -> [28, 28] float32 with 1.0 = stroke, 0.0 = background."""
    image = Image.open(io.BytesIO(png_bytes))
    if image.size != SOURCE_SIZE:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected 105x105")
    if resize == "lanczos":
        small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    else:
        small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST).convert("L")
    return 1.0 - np.asarray(small, dtype=np.float32) / 255.0  # 1 - brightness, [28, 28]


def read_zip(zip_path, spec, resize, out, bar):
    """Check a zip's layout and counts, decode its drawings into out[:spec.characters] (float32 [characters, 20,
    1, 28, 28], in the documented order) advancing the progress bar, and return the class names in that order:
    "<folder>/<Alphabet>/<characterNN>", e.g. "images_background/Greek/character03"."""
    refetch = f"Delete {zip_path} and run again to download the official copy."
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise PreprocessError(f"{zip_path}: not a readable zip file ({error}). {refetch}") from error
    with archive:
        drawings_of = defaultdict(list)  # (alphabet, character) -> member names
        for name in archive.namelist():
            if name.endswith("/"):  # a folder entry
                continue
            parts = name.split("/")
            if len(parts) != 4 or parts[0] != spec.folder or not parts[3].endswith(".png"):
                raise PreprocessError(f"{zip_path}: unexpected entry {name!r}; every file must be "
                                      f"{spec.folder}/<Alphabet>/<characterNN>/<NNNN_NN>.png. {refetch}")
            drawings_of[(parts[1], parts[2])].append(name)
        alphabet_count = len({alphabet for alphabet, _ in drawings_of})
        if alphabet_count != spec.alphabets or len(drawings_of) != spec.characters:
            raise PreprocessError(f"{zip_path}: found {alphabet_count} alphabets and {len(drawings_of)} characters, "
                                  f"expected {spec.alphabets} and {spec.characters}. {refetch}")
        for (alphabet, character), names in drawings_of.items():
            if len(names) != DRAWINGS_PER_CHARACTER:
                raise PreprocessError(f"{zip_path}: {spec.folder}/{alphabet}/{character} has {len(names)} drawings, "
                                      f"expected {DRAWINGS_PER_CHARACTER}. {refetch}")
        characters = sorted(drawings_of)
        for index, character in enumerate(characters):
            for drawing, name in enumerate(sorted(drawings_of[character])):
                try:
                    out[index, drawing, 0] = decode_drawing(archive.read(name), resize)
                except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                    raise PreprocessError(
                        f"{zip_path}: cannot read {name} ({error}). The zip is damaged. {refetch}") from error
            bar.update(DRAWINGS_PER_CHARACTER)
    return [f"{spec.folder}/{alphabet}/{character}" for alphabet, character in characters]


def sidecar_path(out_path):
    """The sidecar of the array out_path: its name with .json in place of .npy. Raises PreprocessError
    for a name not ending in .npy, so that no two arrays share a sidecar."""
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise PreprocessError(f"{out_path} does not end in .npy: an array's sidecar is its name with .json in place "
                              f"of .npy, so the array must be a .npy file, e.g. {out_path.with_suffix('.npy')}")
    return out_path.with_suffix(".json")


def save_omniglot(out_path, omniglot, sidecar):
    """Write the array omniglot to out_path, then the dict sidecar with an "array" entry added (the size and
    sha256 of out_path's exact bytes) to sidecar_path(out_path), each atomically: the pair that the module
    docstring describes. Ctrl-C is held back until both are in place (signal handlers need the main thread).
    If the sidecar cannot be written, the new array is removed too. Raises PreprocessError."""
    out_path = Path(out_path)
    sidecar_file = sidecar_path(out_path)
    buffer = io.BytesIO()
    np.save(buffer, omniglot)
    array_bytes = buffer.getbuffer()
    checksum = {"size": array_bytes.nbytes, "sha256": hashlib.sha256(array_bytes).hexdigest()}
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        atomic_write(out_path, array_bytes)
        try:
            atomic_write(sidecar_file, json.dumps({"array": checksum, **sidecar}, indent=1).encode())
        except RunFileError:
            out_path.unlink(missing_ok=True)
            raise
    except RunFileError as error:  # disk full, folder removed meanwhile, ...
        raise PreprocessError(f"{error}. Check the free space and --out.") from error
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if interrupted:
            signal.raise_signal(signal.SIGINT)


def read_output(path, class_count):
    """Check the array at path against its sidecar; return (the array, the sidecar dict). Accepts only a
    readable regular .npy file (no pickles) holding float32 [class_count, 20, 1, 28, 28], not all zeros, whose
    sidecar is JSON recording the size and sha256 of the exact bytes that the array is loaded from. Otherwise
    raises PreprocessError with one line that names the file and the fix."""
    path = Path(path)
    rebuild = f"rebuild it with: python preprocess_omniglot.py --force --out {path}"
    try:
        if path.is_dir():
            raise PreprocessError(f"{path} is a folder, not an array file; name the .npy file, "
                                  f"e.g. {path / 'omniglot.npy'}")
        sidecar_file = sidecar_path(path)
        if not stat.S_ISREG(path.stat().st_mode):
            raise PreprocessError(f"{path} is not a regular file; {rebuild}")
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise PreprocessError(
            f"{path} not found; build it with: python preprocess_omniglot.py --out {path}") from error
    except OSError as error:
        raise PreprocessError(
            f"cannot read {path} ({error.strerror or error}); make it readable or {rebuild}") from error
    if not data:
        raise PreprocessError(f"{path} is empty; {rebuild}")
    if not data.startswith(np.lib.format.MAGIC_PREFIX):
        raise PreprocessError(f"{path} is not a .npy file (it does not start like one); {rebuild}")
    try:
        omniglot = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError) as error:  # a damaged header, missing data, pickled objects
        raise PreprocessError(f"{path} is not a loadable .npy array ({error}); {rebuild}") from error
    expected_shape = (class_count, DRAWINGS_PER_CHARACTER, 1, IMAGE_SIZE, IMAGE_SIZE)
    wrong = omniglot.shape != expected_shape or omniglot.dtype != np.float32
    if wrong or not np.isfinite(omniglot).all():  # NaN pixels would stop training at its first meta-step
        what = f"{omniglot.dtype} {omniglot.shape}, expected float32 {expected_shape}" if wrong else "NaN/inf pixels"
        raise PreprocessError(f"{path} holds {what}; {rebuild}")
    try:
        sidecar = json.loads(sidecar_file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise PreprocessError(f"{path} has no sidecar {sidecar_file} to check it against; {rebuild}") from error
    except OSError as error:
        raise PreprocessError(f"cannot read {sidecar_file}, the sidecar of {path} ({error.strerror or error}); "
                              f"{rebuild}") from error
    except ValueError as error:  # not JSON, not UTF-8
        raise PreprocessError(f"{sidecar_file}, the sidecar of {path}, is not JSON ({error}); {rebuild}") from error
    recorded = sidecar.get("array") if isinstance(sidecar, dict) else None
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        raise PreprocessError(f"{sidecar_file} records no checksum of {path}: it was written by an older "
                              f"preprocess_omniglot.py, so the pair cannot be checked; {rebuild}")
    if recorded != {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}:
        raise PreprocessError(f"{path} does not match the size and sha256 recorded in its sidecar {sidecar_file}: "
                              f"the two were not written together, or one changed since; {rebuild}")
    if not omniglot.any():
        raise PreprocessError(f"{path} holds no strokes (every pixel is 0); {rebuild}")
    return omniglot, sidecar


def load_omniglot(path):
    """The preprocessed Omniglot at path, float32 [1623, 20, 1, 28, 28]; what training loads. Builds nothing:
    raises PreprocessError (read_output) unless the array and its sidecar are a consistent pair."""
    return read_output(path, CLASS_COUNT)[0]


def existing_output_is_valid(out_path, resize, class_count):
    """True if out_path and its sidecar are a consistent pair made with this resize method."""
    try:
        _, sidecar = read_output(out_path, class_count)
    except PreprocessError:
        return False
    return sidecar.get("resize") == resize and len(sidecar.get("classes", ())) == class_count


def check_out_path(out_path):
    """Raise PreprocessError unless out_path can take the array, with its sidecar beside it."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise PreprocessError(f"--out {out_path} is a folder; name the array file in it, "
                              f"e.g. --out {out_path / 'omniglot.npy'}")
    if sidecar_path(out_path).is_dir():
        raise PreprocessError(f"{sidecar_path(out_path)}, where the sidecar of --out {out_path} goes, is a folder; "
                              f"move it away or choose another --out")


def preprocess(zips_dir, out_path, force=False, resize="nearest"):
    """Build out_path (the array) and its sidecar from the zips in zips_dir; return out_path. A consistent
    existing pair made with the same resize method is kept unless force is true; any other is rebuilt. Raises
    PreprocessError naming the file and the fix on any bad input, before writing anything if it is a bad
    out_path. A failure, Ctrl-C included, leaves no folder that it created."""
    if resize not in RESIZE_METHODS:
        raise PreprocessError(f"unknown resize method {resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
    out_path = Path(out_path)
    check_out_path(out_path)
    class_count = sum(spec.characters for spec in ZIPS)
    if not force and existing_output_is_valid(out_path, resize, class_count):
        print(f"{out_path} already exists and is valid; kept (use --force to rebuild).")
        return out_path

    started = time.perf_counter()
    with new_folders_removed_on_failure(out_path.parent.absolute(), Path(zips_dir).absolute()):
        try:  # fail now, not after the slow part, if the folder cannot take new files
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out_path.parent).close()
        except OSError as error:
            raise PreprocessError(f"cannot write to the output folder {out_path.parent} ({error}). "
                                  f"Choose another --out or make the folder writable.") from error
        zip_paths = ensure_zips(zips_dir)
        omniglot = np.empty((class_count, DRAWINGS_PER_CHARACTER, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        class_names = []
        with tqdm.tqdm(total=class_count * DRAWINGS_PER_CHARACTER, unit="drawing", desc="decoding") as bar:
            for spec, zip_path in zip(ZIPS, zip_paths):
                class_names += read_zip(zip_path, spec, resize, omniglot[len(class_names):], bar)
        save_omniglot(out_path, omniglot, {
            "shape": list(omniglot.shape), "dtype": str(omniglot.dtype),
            "pixels": "1.0 = pen stroke, 0.0 = background", "resize": resize,
            "order": "images_background then images_evaluation; alphabets, characters and drawings each sorted by "
                     "name",
            "classes": class_names,
            "sources": {path.name: {"size": path.stat().st_size, "md5": file_md5(path)} for path in zip_paths},
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__},
        })
    print(f"Wrote {out_path} {omniglot.shape} and {sidecar_path(out_path).name}: "
          f"{class_count * DRAWINGS_PER_CHARACTER:,} drawings in {time.perf_counter() - started:.1f} s.")
    return out_path


def main(argv=None):
    parser = Parser(prog="preprocess_omniglot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--zips", default="data/", help="folder holding (or receiving) the two zips")
    parser.add_argument("--out", default=RUN_DEFAULTS["data"], help="output array (.npy); its sidecar goes beside it")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid output exists")
    parser.add_argument("--resize", choices=RESIZE_METHODS, default="nearest",
                        help="nearest: as the MAML reference (default); lanczos: antialiased")
    args = parser.parse_args(argv)
    status = 2  # a bad --out is a bad argument: exit 2, as argparse (and maml_omniglot.py) does
    try:
        check_out_path(args.out)
        status = 1  # from here on: bad input data, or a failed download or write
        preprocess(args.zips, args.out, force=args.force, resize=args.resize)
    except PreprocessError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing half-written is left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
