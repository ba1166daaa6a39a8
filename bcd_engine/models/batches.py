"""Feeding in-memory uint8 images to a model, batch by batch, on any Keras backend.

NumPy gathers each batch and :func:`~bcd_engine.models.augment.augment_batch` makes its augmented views;
a thread prepares the next batch while the model computes the current one. :func:`view_batches` serves
inference (feature extraction, test-time views); :func:`training_batches` serves ``model.fit``, with a
new shuffle and new augmented views every epoch, both decided by the seed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bcd_engine.models.augment import augment_batch, view_seeds
from bcd_engine.models.backend import filled_for_devices
from bcd_engine.models.config import AugmentConfig

PREFETCH = 2  # batches prepared ahead of the one the model is working on


def view_batches(
    images: np.ndarray,
    rows: np.ndarray,
    views: np.ndarray,
    image_keys: list[str],
    *,
    augment: AugmentConfig,
    seed: int,
    batch_size: int,
) -> Iterator:
    """Batches of ``images[rows[j]]`` seen as ``views[j]`` (0: the image itself), in order, in 0..255: uint8 NumPy
    when no image of the batch is augmented, else float32 backend tensors (for :func:`backend.forward_function`).

    ``image_keys[j]`` (the image's md5) and ``seed`` decide each augmented view (see :func:`view_seeds`).
    """
    rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
    seeds = view_seeds(image_keys, views, seed=seed)

    def make(start: int):
        chosen, untouched = rows[start : start + batch_size], views[start : start + batch_size] == 0
        if untouched.all():
            return images[chosen]  # uint8: the model's compiled call casts it
        return augment_batch(
            images[chosen], seeds[start : start + batch_size], augment, untouched=untouched, as_tensor=True
        )

    yield from _prefetched(make, range(0, len(rows), batch_size))


def _prefetched(make, starts) -> Iterator:
    """``make(start)`` for each start, in order, up to :data:`PREFETCH` of them computed ahead in threads."""
    starts = list(starts)
    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="bcd-batches") as pool:
        pending = [pool.submit(make, start) for start in starts[:PREFETCH]]
        for position in range(len(starts)):
            batch = pending.pop(0).result()
            if position + PREFETCH < len(starts):
                pending.append(pool.submit(make, starts[position + PREFETCH]))
            yield batch


def training_batches(
    images: np.ndarray,
    one_hot: np.ndarray,
    *,
    preprocess,
    augment: AugmentConfig | None,
    seed: int,
    batch_size: int,
    class_weight: dict[int, float] | None = None,
    multiple_of: int = 1,
):
    """A ``keras.utils.PyDataset`` of (preprocessed images, one-hot labels[, sample weights]) for ``model.fit``.

    With ``augment`` each epoch shuffles the images and gives every one a new augmented view, both drawn
    from (``seed``, epoch); without it (validation) the images come as they are, in order. ``class_weight``
    becomes per-image sample weights. With ``multiple_of`` > 1 (the devices a batch is split over) a short
    last batch is filled up to a multiple of it with images of weight 0, which change nothing.
    """
    return _training_batches_class()(
        images,
        one_hot,
        preprocess=preprocess,
        augment=augment,
        seed=seed,
        batch_size=batch_size,
        class_weight=class_weight,
        multiple_of=multiple_of,
    )


@functools.cache
def _training_batches_class():
    import keras

    class TrainingBatches(keras.utils.PyDataset):
        def __init__(self, images, one_hot, *, preprocess, augment, seed, batch_size, class_weight, multiple_of):
            super().__init__(workers=PREFETCH, use_multiprocessing=False, max_queue_size=PREFETCH)
            self.images, self.one_hot, self.preprocess, self.augment = images, one_hot, preprocess, augment
            self.seed, self.batch_size, self.multiple_of, self.epoch = seed, batch_size, multiple_of, 0
            labels = np.argmax(one_hot, axis=1)
            self.weights = (
                np.array([class_weight[int(k)] for k in labels], dtype=np.float32)
                if class_weight
                else np.ones(len(labels), np.float32)
                if multiple_of > 1
                else None
            )
            self._draw()

        def _draw(self) -> None:
            """This epoch's order and the seed pair of each image's view."""
            rng = np.random.default_rng([self.seed, self.epoch])
            n = len(self.images)
            self.order = rng.permutation(n) if self.augment is not None else np.arange(n)
            self.seeds = rng.integers(0, 2**31 - 1, size=(n, 2)).astype(np.int32)

        def __len__(self) -> int:
            return -(-len(self.images) // self.batch_size)

        def __getitem__(self, index: int):
            chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            if self.augment is not None:
                x = np.require(augment_batch(self.images[chosen], self.seeds[chosen], self.augment), np.float32, "W")
            else:
                x = self.images[chosen].astype(np.float32)
            x = np.asarray(self.preprocess(x), np.float32)
            x = filled_for_devices(x, self.multiple_of)
            labels = filled_for_devices(self.one_hot[chosen], self.multiple_of)
            if self.weights is None:
                return x, labels
            # The filler copies weigh nothing.
            return x, labels, np.concatenate([self.weights[chosen], np.zeros(len(x) - len(chosen), np.float32)])

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._draw()

    return TrainingBatches
