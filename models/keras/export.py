"""Exports the Keras zoo models with tf2onnx: graphs from another framework than torch, with its
patterns (NHWC inputs behind Transposes, Tensordot's shape arithmetic, Keras attention's Einsums).

The .onnx files beside this script are its output and ship with the package; TensorFlow is not a
dependency. To rebuild them (weights are seeded, so the graphs come out the same):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.17.0 \
        onnx==1.16.2 "numpy<2"
    /tmp/tf/bin/python models/keras/export.py

(tf2onnx 1.17 leaves TF calls unconverted on Keras 3, i.e. TensorFlow 2.16 and later.)
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

L = keras.layers
HERE = os.path.dirname(os.path.abspath(__file__))


def hard_swish(x):
    return x * (L.ReLU(6.0)(x + 3.0) / 6.0)  # as keras.applications.MobileNetV3 builds it


def activation(x, act):
    return hard_swish(x) if act == "hard_swish" else L.Activation(act)(x) if act else x


def conv_bn(x, c, k=3, stride=1, act="relu"):
    x = L.Conv2D(c, k, stride, padding="same", use_bias=False)(x)
    return activation(L.BatchNormalization()(x), act)


def keras_cnn():
    """A residual block, a separable conv, a MobileNetV3 block (hard-swish, squeeze-excitation),
    and an Inception-style concatenation, on a 64x64 NHWC image."""
    inp = keras.Input((64, 64, 3), name="image")
    x = conv_bn(inp, 32, stride=2)
    y = conv_bn(conv_bn(x, 32), 32, act=None)
    x = L.ReLU()(x + y)
    x = L.SeparableConv2D(48, 3, padding="same", use_bias=False)(x)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    # inverted residual: expand, depthwise with hard-swish, squeeze-excitation, project
    e = conv_bn(x, 96, k=1, act="hard_swish")
    e = L.DepthwiseConv2D(3, 2, padding="same", use_bias=False)(e)
    e = hard_swish(L.BatchNormalization()(e))
    s = L.GlobalAveragePooling2D(keepdims=True)(e)
    s = L.Conv2D(24, 1, activation="relu")(s)
    s = L.Conv2D(96, 1, activation="hard_sigmoid")(s)
    x = conv_bn(L.Multiply()([e, s]), 48, k=1, act=None)
    # two branches concatenated
    a = conv_bn(x, 32, k=1)
    b = conv_bn(conv_bn(x, 24, k=1), 32)
    x = L.Concatenate()([a, b])
    x = conv_bn(x, 64, k=1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10)(x), name="keras_cnn")


def keras_encoder():
    """Token embeddings, two post-norm encoder layers of Keras MultiHeadAttention (4 heads of 16)
    and a GELU FFN, mean-pooled."""
    tokens = keras.Input((32,), dtype="int64", name="input_ids")
    x = L.Embedding(512, 64)(tokens)
    for _ in range(2):
        a = L.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
        x = L.LayerNormalization()(x + a)
        f = L.Dense(128, activation="gelu")(x)
        x = L.LayerNormalization()(x + L.Dense(64)(f))
    return keras.Model(tokens, L.GlobalAveragePooling1D()(x), name="keras_encoder")


MODELS = {"keras_cnn": keras_cnn, "keras_encoder": keras_encoder}


def export(name):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    inp = model.inputs[0]
    spec = [tf.TensorSpec((None,) + tuple(inp.shape[1:]), inp.dtype, name=inp.name)]
    fn = tf.function(lambda x: model(x, training=False))
    tf2onnx.convert.from_function(fn, input_signature=spec, opset=17, output_path=os.path.join(HERE, name + ".onnx"))


if __name__ == "__main__":
    for name in sys.argv[1:] or MODELS:
        export(name)
        print("wrote", name)
