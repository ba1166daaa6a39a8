"""The classification head on pooled backbone features, its optimizer, and the assembled model.

Phase 1 of fine-tuning trains the head on cached frozen-backbone features (:func:`fit_head_on_features`);
:func:`assemble_model` joins backbone, pooling and head into one Keras model on preprocessed images, and
:func:`unfreeze_top_layers` prepares phase 2.
"""

from __future__ import annotations

import numpy as np

from bcd_engine.models.backbones import get_backbone, pooling_layer
from bcd_engine.models.config import TrainConfig


def build_head(n_features: int, n_classes: int, config: TrainConfig, *, seed: int | None = None):
    """The classification head on pooled features: [dense + dropout] then softmax (float32 output).

    Building touches no global state. With ``seed`` the initial weights are drawn from a generator of their
    own (a NumPy ``Generator`` on ``seed`` hands each layer its initializer's seed), so the same seed gives the
    same head wherever it is built; training passes the run's seed. Without it they come from Keras' default
    generators as the caller seeded them. The dropout draws from ``config.seed``.
    """
    import keras
    from keras import layers

    layer_seeds = None if seed is None else np.random.default_rng(seed)

    def kernel_initializer():
        drawn = None if layer_seeds is None else int(layer_seeds.integers(2**31 - 1))
        return keras.initializers.GlorotUniform(seed=drawn)  # Dense's default initializer

    inputs = keras.Input((n_features,))
    x = inputs
    if config.dense_units:
        x = layers.Dense(
            config.dense_units,
            activation=config.dense_activation,
            kernel_initializer=kernel_initializer(),
            name="head_dense",
        )(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, seed=config.seed, name="head_dropout")(x)
    outputs = layers.Dense(
        n_classes, activation="softmax", dtype="float32", kernel_initializer=kernel_initializer(), name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def make_optimizer(name: str, learning_rate: float):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def compile_model(model, config: TrainConfig, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=make_optimizer(config.optimizer, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )


def class_weight_dict(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights (scikit-learn's formula) for the training labels."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {k: 1.0 for k in range(n_classes)}
    out.update({int(k): float(w) for k, w in zip(present, weights)})
    return out


def fit_head_on_features(
    train_x, train_y, val_x, val_y, *, n_classes: int, config: TrainConfig, callbacks=(), class_weight=None
):
    """Phase 1 on cached features: returns the trained head (best validation-loss weights restored).

    The head starts from the weights ``config.seed`` draws (:func:`build_head`), the same every run; the
    order of the features each epoch is drawn from Keras' process-wide generators, which
    :func:`bcd_engine.training.run.train` seeds with the run's seed.
    """
    import keras

    head = build_head(train_x.shape[1], n_classes, config, seed=config.seed)
    compile_model(head, config, config.learning_rate)
    one_hot = lambda y: keras.utils.to_categorical(y, n_classes)
    head.fit(
        train_x,
        one_hot(train_y),
        batch_size=config.batch_size,
        shuffle=True,  # a new order every epoch
        validation_data=(val_x, one_hot(val_y)) if len(val_x) else None,
        epochs=config.epochs,
        callbacks=[early_stopping(config), *callbacks],
        class_weight=class_weight,
        verbose=0,
    )
    return head


def early_stopping(config: TrainConfig):
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)


def assemble_model(backbone, head, config: TrainConfig):
    """Backbone (BatchNorm in inference mode) + pooling + head as one Keras model on preprocessed images."""
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    # A pretrained backbone keeps BatchNorm in inference mode, also when its top layers are unfrozen;
    # a network trained from scratch learns its BatchNorm statistics.
    x = backbone(inputs, training=False) if get_backbone(config.backbone).pretrained else backbone(inputs)
    x = pooling_layer(config.pooling)(x)
    return keras.Model(inputs, head(x), name=f"bcd_{config.backbone}")


def unfreeze_top_layers(backbone, k: int) -> None:
    """Make the top ``k`` layers trainable, BatchNorm excepted (it stays frozen in inference mode)."""
    import keras

    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        top = i >= len(backbone.layers) - k
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
