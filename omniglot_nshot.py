"""OmniglotNShot: batches of N-way K-shot tasks from data/omniglot.npy.

A task (an "episode") is a tiny classification problem: pick N characters, give each a label
0..N-1, and show the learner K drawings of each (the support set, to adapt on) and Q other
drawings of each (the query set, to be scored on). MAML meta-trains on batches of T tasks
(T = task_num, the meta-batch):

    x_spt [T, N*K, 1, 28, 28] float32    y_spt [T, N*K] int64
    x_qry [T, N*Q, 1, 28, 28] float32    y_qry [T, N*Q] int64

The arguments keep the command line's names: n_way (N), k_spt (K), k_qry (Q), task_num (T), and
split for "train", "val" or "test".

Split. The 1623 characters are shuffled once with a fixed split seed (1, never the training
seed) and cut as in the MAML reference code: 1100 train, 100 validation, 423 test. The paper's
"1200 training characters" are the first two together. self.classes holds the three index arrays.

Sampling, per task:
  * N distinct characters of the split, in a random order; label i goes to the i-th, so the
    labels are a random permutation per task. Labelling by sorted class id instead leaks the
    labels: the ids follow the alphabets' order, an alphabet's style shows in its drawings, so an
    unadapted network can guess a character's rank among the N and score above chance (1/N)
    without adapting at all.
  * K + Q distinct drawings of each character: the first K form the support set, the other Q the
    query set, so support and query never share a drawing.
  * Following Santoro et al., as the paper does, each character is rotated by a random multiple
    of 90 degrees, drawn per character per task, on every split (rotate=False turns it off).
  * The support and the query examples are each shuffled, so position says nothing about label.

Speed. Each split has its own random generator, seeded by (seed, split), and a cache of
cache_size pre-sampled batches, drawn in one go with vectorised numpy. The cache holds only
indices: for every example slot, which drawing, which rotation and which label. next() turns one
cached batch into images with one gather and one rot90 per rotation, on the device, so sampling
costs a few milliseconds a batch, far less than a meta-step.

Reproducibility. The same seed gives the same batches. state_dict() / load_state_dict() save
and restore the exact position in every split's stream (for checkpoints), and reset(split) starts
a split over from its seed (the experiment resets "val" before each validation so that every
validation sees the same tasks).
"""

import copy
from pathlib import Path

import numpy as np
import torch

from preprocess_omniglot import CLASS_COUNT, DRAWINGS_PER_CHARACTER, IMAGE_SIZE, load_omniglot, preprocess

SPLIT_SEED = 1
SPLIT_SIZES = {"train": 1100, "val": 100, "test": CLASS_COUNT - 1100 - 100}  # a split's index seeds its generator


def task_shape_problem(n_way, k_spt, k_qry, task_num):
    """The first rule a task shape breaks, as (argument names, what is wrong), or None if it is possible.

    The one statement of these rules: OmniglotNShot raises them, and run_files.config_problem refuses them
    (with the names as flags) before any data is loaded.
    """
    smallest = min(SPLIT_SIZES, key=SPLIT_SIZES.get)
    rules = [
        (n_way < 2, ("n_way",), f"must be at least 2 (a task needs two classes), got {n_way}"),
        (n_way > SPLIT_SIZES[smallest], ("n_way",),
         f"{n_way} is more than the {SPLIT_SIZES[smallest]} classes of the {smallest} split"),
        (k_spt < 1, ("k_spt",), f"must be at least 1, got {k_spt}"),
        (k_qry < 1, ("k_qry",), f"must be at least 1, got {k_qry}"),
        (k_spt + k_qry > DRAWINGS_PER_CHARACTER, ("k_spt", "k_qry"),
         f"= {k_spt + k_qry} is more than the {DRAWINGS_PER_CHARACTER} drawings of an Omniglot character"),
        (task_num < 1, ("task_num",), f"must be at least 1, got {task_num}"),
    ]
    return next(((names, problem) for broken, names, problem in rules if broken), None)


class OmniglotNShot:
    """Batches of task_num N-way (n_way) K-shot (k_spt) tasks with Q (k_qry) query drawings per class.

    path: the preprocessed array, built by preprocess_omniglot if missing (zips looked for, or
    downloaded, beside it). device: where next() returns its tensors. seed: picks the episodes, not
    the split. rotate: random quarter turns per class per task. cache_size: batches sampled at a
    time per split.
    """

    def __init__(self, path, task_num=32, n_way=5, k_spt=1, k_qry=1,
                 device="cpu", seed=0, rotate=True, cache_size=100):
        problem = task_shape_problem(n_way, k_spt, k_qry, task_num)
        if problem is not None:
            names, what = problem
            raise ValueError(f"{' + '.join(names)} {what}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.task_num, self.n_way, self.k_spt, self.k_qry = task_num, n_way, k_spt, k_qry
        self.device, self.seed, self.rotate, self.cache_size = torch.device(device), seed, rotate, cache_size

        # All of Omniglot as one tensor on the device; row class_id * 20 + drawing_id.
        self.drawings = self._load(Path(path))  # [1623 * 20, 1, 28, 28]

        shuffled = np.random.default_rng(SPLIT_SEED).permutation(CLASS_COUNT)
        train_end = SPLIT_SIZES["train"]
        val_end = train_end + SPLIT_SIZES["val"]
        self.classes = {"train": shuffled[:train_end], "val": shuffled[train_end:val_end],
                        "test": shuffled[val_end:]}

        self._generators, self._cache, self._cache_start_state, self._position = {}, {}, {}, {}
        for split in SPLIT_SIZES:
            self.reset(split)

    def _load(self, path):
        """The preprocessed array, checked against its sidecar, as [1623 * 20, 1, 28, 28] on the device;
        built from the zips first if it is missing."""
        if not path.exists():
            preprocess(zips_dir=path.parent, out_path=path)
        return torch.from_numpy(load_omniglot(path)).flatten(0, 1).to(self.device)  # [1623, 20, ...] -> [32460, ...]

    def _check_split(self, split):
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SIZES)}")

    def reset(self, split):
        """Start split over from its seed: the same batches as a fresh OmniglotNShot."""
        self._check_split(split)
        self._generators[split] = np.random.default_rng([self.seed, list(SPLIT_SIZES).index(split)])
        self._cache[split] = None  # filled on first use
        self._cache_start_state[split] = self._generators[split].bit_generator.state
        self._position[split] = 0

    def _fill_cache(self, split):
        """Sample cache_size batches of index arrays for split, all at once."""
        generator = self._generators[split]
        self._cache_start_state[split] = generator.bit_generator.state
        classes = self.classes[split]
        tasks = (self.cache_size, self.task_num)  # C, T
        n, k, q = self.n_way, self.k_spt, self.k_qry

        # N distinct classes per task in a random order (the first N of a random permutation of
        # the split); the i-th gets label i.
        class_ids = classes[generator.random(tasks + (len(classes),)).argsort(axis=-1)[..., :n]]  # [C, T, N]
        # K + Q distinct drawings per class: the first K for the support set, the rest for the query.
        drawing_ids = generator.random(tasks + (n, DRAWINGS_PER_CHARACTER)).argsort(axis=-1)[..., :k + q]
        example_ids = class_ids[..., None] * DRAWINGS_PER_CHARACTER + drawing_ids  # [C, T, N, K+Q]
        if self.rotate:
            rotations = generator.integers(0, 4, size=tasks + (n,))  # [C, T, N], quarter turns
        else:
            rotations = np.zeros(tasks + (n,), dtype=np.int64)
        rotations = np.broadcast_to(rotations[..., None], example_ids.shape)  # [C, T, N, K+Q]
        labels = np.broadcast_to(np.arange(n)[:, None], example_ids.shape)  # [C, T, N, K+Q]

        # Each task's slots: its N*K support examples, then its N*Q query examples, each part in a
        # random order shared by the ids, rotations and labels.
        support_order = generator.random(tasks + (n * k,)).argsort(axis=-1)  # [C, T, N*K]
        query_order = generator.random(tasks + (n * q,)).argsort(axis=-1)  # [C, T, N*Q]

        def slots(part):
            """[C, T, N, K+Q] -> [C, T, N*K + N*Q]: shuffled support slots, then shuffled query slots."""
            support = part[..., :k].reshape(tasks + (n * k,))
            query = part[..., k:].reshape(tasks + (n * q,))
            return np.concatenate([np.take_along_axis(support, support_order, axis=-1),
                                   np.take_along_axis(query, query_order, axis=-1)], axis=-1)

        self._cache[split] = tuple(
            torch.from_numpy(slots(part)).to(self.device) for part in (example_ids, rotations, labels)
        )  # 3 x [C, T, N*K + N*Q]: which drawing, how many quarter turns, which label

    def _images(self, example_ids, rotations):
        """Gather the drawings and turn each by its number of quarter turns (counter-clockwise):
        [T, M] ids and rotations -> [T, M, 1, 28, 28], one rot90 per rotation group, on the device."""
        images = self.drawings[example_ids]  # [T, M, 1, 28, 28], a copy we may modify
        if self.rotate:
            for quarter_turns in (1, 2, 3):
                turned = rotations == quarter_turns  # [T, M]
                images[turned] = torch.rot90(images[turned], quarter_turns, dims=(-2, -1))
        return images

    def next(self, split="train"):
        """The next batch of tasks of split: x_spt, y_spt, x_qry, y_qry (shapes in the module docstring)."""
        self._check_split(split)
        if self._cache[split] is None or self._position[split] == self.cache_size:
            self._fill_cache(split)
            self._position[split] = 0
        batch = self._position[split]
        self._position[split] += 1

        example_ids, rotations, labels = (slots[batch] for slots in self._cache[split])  # [T, N*(K+Q)]
        images = self._images(example_ids, rotations)  # [T, N*(K+Q), 1, 28, 28]
        support_size = self.n_way * self.k_spt
        x_spt = images[:, :support_size].contiguous()  # [T, N*K, 1, 28, 28]
        x_qry = images[:, support_size:].contiguous()  # [T, N*Q, 1, 28, 28]
        y_spt = labels[:, :support_size].contiguous()  # [T, N*K]
        y_qry = labels[:, support_size:].contiguous()  # [T, N*Q]
        return x_spt, y_spt, x_qry, y_qry

    def _settings(self):
        return {"seed": self.seed, "task_num": self.task_num, "n_way": self.n_way, "k_spt": self.k_spt,
                "k_qry": self.k_qry, "rotate": self.rotate, "cache_size": self.cache_size}

    def state_dict(self):
        """A small picklable dict: for each split, the generator state that filled (or will fill) its
        current cache, and the position in that cache."""
        return {
            "settings": self._settings(),
            "splits": {
                split: {"generator_state": copy.deepcopy(self._cache_start_state[split]),
                        "position": self._position[split]}
                for split in SPLIT_SIZES
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
        for split in SPLIT_SIZES:
            saved = state["splits"][split]
            self._generators[split].bit_generator.state = copy.deepcopy(saved["generator_state"])
            self._fill_cache(split)
            self._position[split] = saved["position"]



def random_tasks(task_num, n_way, k_spt, k_qry, generator, dtype=torch.float32):
    """Synthetic tasks shaped as OmniglotNShot.next serves them: random images, labels shuffled per task.
    For tests and benchmark.py, which must not depend on the data."""
    def labels(k):
        return torch.stack([torch.randperm(n_way, generator=generator).repeat(k) for _ in range(task_num)])
    x_spt = torch.rand(task_num, n_way * k_spt, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=dtype)
    x_qry = torch.rand(task_num, n_way * k_qry, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=dtype)
    return x_spt, labels(k_spt), x_qry, labels(k_qry)
