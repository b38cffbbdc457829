"""Shared test fixtures and helpers: no network, fake Omniglot zips, fake and real
data/omniglot.npy arrays, and reading a run's log.csv.

The real data are read from the zips in data/ (where the README tells users to put them) or in
../shared/omniglot (beside the checkout, as in CI); tests that need them skip without them, saying why
in pytest's summary (pytest.ini asks for -rs). Tests never write into the repository: everything goes
to pytest's tmp_path.
"""

import io
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import preprocess_omniglot
import run_files

ROOT = Path(__file__).resolve().parents[1]
# Where the real zips may be: the README's data/, then beside the checkout as in CI.
REAL_ZIP_FOLDERS = (ROOT / "data", ROOT.parent / "shared" / "omniglot")
REAL_ZIPS = next((folder for folder in REAL_ZIP_FOLDERS if all((folder / zip_name).is_file() for zip_name in
                  ("images_background.zip", "images_evaluation.zip"))), None)

# The fake zips: a few alphabets, listed out of order in the zip so that tests see the sorting.
# {alphabet: number of characters}
FAKE_BACKGROUND = {"Zulu_Script": 2, "Alpha_Script": 1, "Mid_Script": 2}  # 5 characters
FAKE_EVALUATION = {"Omega_Script": 1, "Beta_Script": 2}  # 3 characters


def log_rows(out, drop=("elapsed_s",)):
    """The rows of out/log.csv without the `drop` columns; by default without elapsed_s, the one
    column (wall-clock time) that cannot repeat between runs."""
    return [{k: v for k, v in row.items() if k not in drop}
            for row in run_files.read_log(os.path.join(out, "log.csv"))]


class RunningProcess:
    """A running maml_omniglot.py whose stderr is read in the background, to watch its progress bar
    (the last "<done>/<iterations> [" it printed)."""

    def __init__(self, argv, env, iterations):
        self.iterations = iterations
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while chunk := os.read(self.popen.stderr.fileno(), 4096):
            self.stderr += chunk

    def progress(self):
        done = re.findall(rb"(\d+)/%d \[" % self.iterations, self.stderr)
        return int(done[-1]) if done else -1

    def wait_for(self, iteration, timeout=120):
        deadline = time.monotonic() + timeout
        while self.progress() < iteration and self.popen.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)

    def finish(self):
        self.popen.wait(timeout=120)
        self.reader.join(timeout=10)
        return self.popen.returncode, self.stderr.decode(errors="replace")


def require_real_zips():
    """The folder of the real zips; skips the calling test, saying why, when there is none."""
    if REAL_ZIPS is None:
        pytest.skip("real-data test: the Omniglot zips are in neither data/ nor ../shared/omniglot; put "
                    "images_background.zip and images_evaluation.zip in data/ to run it")
    return REAL_ZIPS


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a URL fails as if offline."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def random_strokes_png(rng):
    """A 105x105 mode "1" PNG, black strokes on white, like an Omniglot drawing."""
    image = Image.new("1", (105, 105), color=1)
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        pen.line([tuple(point) for point in rng.integers(5, 100, size=(4, 2))], fill=0, width=3)
    png = io.BytesIO()
    image.save(png, format="PNG")
    return png.getvalue()


@pytest.fixture
def write_fake_zip():
    """write_fake_zip(path, folder, characters_per_alphabet, drawings=20) writes a zip in the
    official layout <folder>/<Alphabet>/characterNN/NNNN_NN.png with random strokes, entries in
    reverse order (so nothing can rely on the listing order). Returns the path."""

    def write(path, folder, characters_per_alphabet, drawings=20):
        rng = np.random.default_rng(len(folder))
        entries = []
        for alphabet, character_count in characters_per_alphabet.items():
            for character in range(1, character_count + 1):
                for drawing in range(1, drawings + 1):
                    name = f"{folder}/{alphabet}/character{character:02d}/{character:04d}_{drawing:02d}.png"
                    entries.append((name, random_strokes_png(rng)))
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in reversed(entries):
                archive.writestr(name, data)
        return Path(path)

    return write


@pytest.fixture
def fake_zips(tmp_path, monkeypatch, write_fake_zip):
    """A folder with a small images_background.zip and images_evaluation.zip (5 + 3 characters),
    and preprocess_omniglot told to expect those counts. Returns the folder."""
    zips_dir = tmp_path / "zips"
    zips_dir.mkdir()
    write_fake_zip(zips_dir / "images_background.zip", "images_background", FAKE_BACKGROUND)
    write_fake_zip(zips_dir / "images_evaluation.zip", "images_evaluation", FAKE_EVALUATION)
    background, evaluation = preprocess_omniglot.ZIPS
    monkeypatch.setattr(preprocess_omniglot, "ZIPS", (
        preprocess_omniglot.ZipSpec(background.folder, len(FAKE_BACKGROUND), sum(FAKE_BACKGROUND.values()),
                                    background.md5),
        preprocess_omniglot.ZipSpec(evaluation.folder, len(FAKE_EVALUATION), sum(FAKE_EVALUATION.values()),
                                    evaluation.md5),
    ))
    return zips_dir


@pytest.fixture(scope="session")
def fake_omniglot_npy(tmp_path_factory):
    """A data/omniglot.npy-like file, shape (1623, 20, 1, 28, 28) float32, whose images say who
    they are: the centre 2x2 block holds the class id and the four corners the drawing id (both
    unchanged by any rotation), and pixel (0, 1) is -1, which shows how the image was rotated.
    Returns the path."""
    classes, drawings = np.meshgrid(np.arange(1623), np.arange(20), indexing="ij")  # [1623, 20] each
    omniglot = np.zeros((1623, 20, 1, 28, 28), dtype=np.float32)
    omniglot[:, :, 0, 13:15, 13:15] = classes[..., None, None]
    for row, column in ((0, 0), (0, 27), (27, 0), (27, 27)):
        omniglot[:, :, 0, row, column] = drawings
    omniglot[:, :, 0, 0, 1] = -1
    path = tmp_path_factory.mktemp("data") / "omniglot.npy"
    preprocess_omniglot.save_omniglot(path, omniglot, {})  # with its sidecar, as training requires
    return path


@pytest.fixture(scope="session")
def learnable_omniglot_npy(tmp_path_factory):
    """A data/omniglot.npy-like file, shape (1623, 20, 1, 28, 28) float32 in [0, 1], that a network
    can learn from: each class is a random sparse stroke pattern and each drawing flips 5% of its
    pixels. For experiment tests (maml_omniglot.py) that must run fast without the real data.
    Returns the path."""
    rng = np.random.default_rng(0)
    templates = rng.random((1623, 1, 1, 28, 28)) < 0.15  # [1623, 1, 1, 28, 28]
    flips = rng.random((1623, 20, 1, 28, 28)) < 0.05  # [1623, 20, 1, 28, 28]
    omniglot = (templates ^ flips).astype(np.float32)
    path = tmp_path_factory.mktemp("learnable") / "omniglot.npy"
    preprocess_omniglot.save_omniglot(path, omniglot, {})
    return path


@pytest.fixture(scope="session")
def real_omniglot_npy(tmp_path_factory):
    """The real Omniglot, preprocessed once per test session from ../shared/omniglot.
    Returns (path of the .npy, seconds the preprocessing took); skips when the zips are not there."""
    require_real_zips()
    out_path = tmp_path_factory.mktemp("real") / "omniglot.npy"
    started = time.perf_counter()
    preprocess_omniglot.preprocess(REAL_ZIPS, out_path)
    return out_path, time.perf_counter() - started
