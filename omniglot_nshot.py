"""OmniglotNShot: batches of N-way K-shot tasks from data/omniglot.npy.

A task (an "episode") is a tiny classification problem: pick N characters, give each a label
0..N-1, and show the learner K drawings of each (the support set, to adapt on) and Q other
drawings of each (the query set, to be scored on). MAML meta-trains on batches of B tasks:

    x_spt [B, N*K, 1, 28, 28] float32    y_spt [B, N*K] int64
    x_qry [B, N*Q, 1, 28, 28] float32    y_qry [B, N*Q] int64

Split. The 1623 characters are shuffled once with a fixed split seed (1, never the training
seed) and cut as in the MAML reference code: 1100 train, 100 validation, 423 test. The paper's
"1200 training characters" are the first two together. self.classes holds the three index arrays.

Sampling, per task:
  * N distinct characters of the split, in a random order; label i goes to the i-th, so the
    labels are a random permutation per task. (Labelling by sorted class id instead leaks the
    labels and gives a famous ~30% "chance" accuracy.)
  * K + Q distinct drawings of each character: the first K form the support set, the other Q the
    query set, so support and query never share a drawing.
  * Following Santoro et al., as the paper does, each character is rotated by a random multiple
    of 90 degrees, drawn per character per task, on every split (rotate=False turns it off).
  * The support and the query examples are each shuffled, so position says nothing about label.

Speed. Each mode (train / val / test) has its own random generator, seeded by (seed, mode), and
a cache of cache_size pre-sampled batches, drawn in one go with vectorised numpy. The cache holds
only indices: for every example slot, which drawing, which rotation and which label. next()
turns one cached batch into images with one gather and one rot90 per rotation, on the device,
so sampling costs a few milliseconds a batch, far less than a meta-step.

Reproducibility. The same seed gives the same batches. state_dict() / load_state_dict() save
and restore the exact position in every mode's stream (for checkpoints), and reset(mode) starts
a mode over from its seed (the experiment resets "val" before each validation so that every
validation sees the same tasks).
"""

import copy
import time
from pathlib import Path

import numpy as np
import torch

from preprocess_omniglot import preprocess

CLASS_COUNT = 1623
DRAWINGS_PER_CHARACTER = 20
IMAGE_SIZE = 28
SPLIT_SEED = 1
SPLIT_SIZES = {"train": 1100, "val": 100, "test": CLASS_COUNT - 1100 - 100}
MODES = tuple(SPLIT_SIZES)  # ("train", "val", "test"); the index also seeds the mode's generator


class OmniglotNShot:
    """Batches of N-way (n_way) K-shot (k_shot) tasks with Q (k_query) query drawings per class.

    path: the preprocessed array, built by preprocess_omniglot if missing (zips looked for, or
    downloaded, beside it). batchsz: tasks per batch. device: where next() returns its tensors.
    seed: picks the episodes, not the split. rotate: random quarter turns per class per task.
    cache_size: batches sampled at a time per mode.
    """

    def __init__(self, path="data/omniglot.npy", batchsz=32, n_way=5, k_shot=1, k_query=1,
                 device="cpu", seed=0, rotate=True, cache_size=100):
        for name, value in (("batchsz", batchsz), ("n_way", n_way), ("k_shot", k_shot),
                            ("k_query", k_query), ("cache_size", cache_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if n_way < 2:
            raise ValueError(f"n_way must be at least 2 to make a classification task, got {n_way}")
        if k_shot + k_query > DRAWINGS_PER_CHARACTER:
            raise ValueError(
                f"k_shot + k_query = {k_shot} + {k_query} = {k_shot + k_query} drawings per character, "
                f"but each character has only {DRAWINGS_PER_CHARACTER}"
            )
        smallest_mode = min(SPLIT_SIZES, key=SPLIT_SIZES.get)
        if n_way > SPLIT_SIZES[smallest_mode]:
            raise ValueError(
                f"n_way = {n_way} is more than the {SPLIT_SIZES[smallest_mode]} classes "
                f"of the {smallest_mode} split"
            )
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.device, self.seed, self.rotate, self.cache_size = torch.device(device), seed, rotate, cache_size

        # All of Omniglot as one tensor on the device; row class_id * 20 + drawing_id.
        self.drawings = self._load(Path(path))  # [1623 * 20, 1, 28, 28]

        shuffled = np.random.default_rng(SPLIT_SEED).permutation(CLASS_COUNT)
        train_end = SPLIT_SIZES["train"]
        val_end = train_end + SPLIT_SIZES["val"]
        self.classes = {"train": shuffled[:train_end], "val": shuffled[train_end:val_end],
                        "test": shuffled[val_end:]}

        self._generators, self._cache, self._cache_start_state, self._position = {}, {}, {}, {}
        for mode in MODES:
            self.reset(mode)

    def _load(self, path):
        """The preprocessed array as [1623 * 20, 1, 28, 28] on the device; preprocess first if missing."""
        if not path.exists():
            preprocess(zips_dir=path.parent, out_path=path)
        omniglot = np.load(path)  # [1623, 20, 1, 28, 28]
        expected_shape = (CLASS_COUNT, DRAWINGS_PER_CHARACTER, 1, IMAGE_SIZE, IMAGE_SIZE)
        if omniglot.shape != expected_shape or omniglot.dtype != np.float32:
            raise ValueError(
                f"{path} holds {omniglot.dtype} {omniglot.shape}, expected float32 {expected_shape}; "
                f"rebuild it with: python preprocess_omniglot.py --force --out {path}"
            )
        return torch.from_numpy(omniglot).flatten(0, 1).to(self.device)

    def _check_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")

    def reset(self, mode):
        """Start mode over from its seed: the same batches as a fresh OmniglotNShot."""
        self._check_mode(mode)
        self._generators[mode] = np.random.default_rng([self.seed, MODES.index(mode)])
        self._cache[mode] = None  # filled on first use
        self._cache_start_state[mode] = self._generators[mode].bit_generator.state
        self._position[mode] = 0

    def _fill_cache(self, mode):
        """Sample cache_size batches of index arrays for mode, all at once."""
        generator = self._generators[mode]
        self._cache_start_state[mode] = generator.bit_generator.state
        split = self.classes[mode]
        tasks = (self.cache_size, self.batchsz)  # C, B
        n, k, q = self.n_way, self.k_shot, self.k_query

        # N distinct classes per task in a random order (the first N of a random permutation of
        # the split); the i-th gets label i.
        class_ids = split[generator.random(tasks + (len(split),)).argsort(axis=-1)[..., :n]]  # [C, B, N]
        # K + Q distinct drawings per class: the first K for the support set, the rest for the query.
        drawing_ids = generator.random(tasks + (n, DRAWINGS_PER_CHARACTER)).argsort(axis=-1)[..., :k + q]
        example_ids = class_ids[..., None] * DRAWINGS_PER_CHARACTER + drawing_ids  # [C, B, N, K+Q]
        if self.rotate:
            rotations = generator.integers(0, 4, size=tasks + (n,))  # [C, B, N], quarter turns
        else:
            rotations = np.zeros(tasks + (n,), dtype=np.int64)
        rotations = np.broadcast_to(rotations[..., None], example_ids.shape)  # [C, B, N, K+Q]
        labels = np.broadcast_to(np.arange(n)[:, None], example_ids.shape)  # [C, B, N, K+Q]

        # Each task's slots: its N*K support examples, then its N*Q query examples, each part in a
        # random order shared by the ids, rotations and labels.
        support_order = generator.random(tasks + (n * k,)).argsort(axis=-1)  # [C, B, N*K]
        query_order = generator.random(tasks + (n * q,)).argsort(axis=-1)  # [C, B, N*Q]

        def slots(part):
            """[C, B, N, K+Q] -> [C, B, N*K + N*Q]: shuffled support slots, then shuffled query slots."""
            support = part[..., :k].reshape(tasks + (n * k,))
            query = part[..., k:].reshape(tasks + (n * q,))
            return np.concatenate([np.take_along_axis(support, support_order, axis=-1),
                                   np.take_along_axis(query, query_order, axis=-1)], axis=-1)

        self._cache[mode] = tuple(
            torch.from_numpy(slots(part)).to(self.device) for part in (example_ids, rotations, labels)
        )  # 3 x [C, B, N*K + N*Q]: which drawing, how many quarter turns, which label

    def _images(self, example_ids, rotations):
        """Gather the drawings and turn each by its number of quarter turns (counter-clockwise):
        [B, M] ids and rotations -> [B, M, 1, 28, 28], one rot90 per rotation group, on the device."""
        images = self.drawings[example_ids]  # [B, M, 1, 28, 28], a copy we may modify
        if self.rotate:
            for quarter_turns in (1, 2, 3):
                turned = rotations == quarter_turns  # [B, M]
                images[turned] = torch.rot90(images[turned], quarter_turns, dims=(-2, -1))
        return images

    def next(self, mode="train"):
        """The next batch of tasks of mode: x_spt, y_spt, x_qry, y_qry (shapes in the module docstring)."""
        self._check_mode(mode)
        if self._cache[mode] is None or self._position[mode] == self.cache_size:
            self._fill_cache(mode)
            self._position[mode] = 0
        batch = self._position[mode]
        self._position[mode] += 1

        example_ids, rotations, labels = (slots[batch] for slots in self._cache[mode])  # [B, N*(K+Q)]
        images = self._images(example_ids, rotations)  # [B, N*(K+Q), 1, 28, 28]
        support_size = self.n_way * self.k_shot
        x_spt = images[:, :support_size].contiguous()  # [B, N*K, 1, 28, 28]
        x_qry = images[:, support_size:].contiguous()  # [B, N*Q, 1, 28, 28]
        y_spt = labels[:, :support_size].contiguous()  # [B, N*K]
        y_qry = labels[:, support_size:].contiguous()  # [B, N*Q]
        return x_spt, y_spt, x_qry, y_qry

    def _settings(self):
        return {"seed": self.seed, "batchsz": self.batchsz, "n_way": self.n_way, "k_shot": self.k_shot,
                "k_query": self.k_query, "rotate": self.rotate, "cache_size": self.cache_size}

    def state_dict(self):
        """A small picklable dict: for each mode, the generator state that filled (or will fill) its
        current cache, and the position in that cache."""
        return {
            "settings": self._settings(),
            "modes": {
                mode: {"generator_state": copy.deepcopy(self._cache_start_state[mode]),
                       "position": self._position[mode]}
                for mode in MODES
            },
        }

    def load_state_dict(self, state):
        """Continue exactly where state_dict() was taken: refill each cache from its saved
        generator state (which regenerates the same batches) and restore the position."""
        if state["settings"] != self._settings():
            raise ValueError(
                f"state was saved with settings {state['settings']}, "
                f"but this OmniglotNShot has {self._settings()}"
            )
        for mode in MODES:
            saved = state["modes"][mode]
            self._generators[mode].bit_generator.state = copy.deepcopy(saved["generator_state"])
            self._fill_cache(mode)
            self._position[mode] = saved["position"]


if __name__ == "__main__":
    for k_query in (1, 15):
        loader = OmniglotNShot(batchsz=32, n_way=5, k_shot=1, k_query=k_query)
        batch_count = 3 * loader.cache_size  # includes the cache refills
        started = time.perf_counter()
        for _ in range(batch_count):
            loader.next("train")
        milliseconds = 1000 * (time.perf_counter() - started) / batch_count
        print(f"5-way 1-shot, {k_query} query, batch 32: {milliseconds:.2f} ms per batch")
