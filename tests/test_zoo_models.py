"""Every zoo model exports to a valid ONNX graph that runs in onnxruntime and matches its source."""

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from onnx_prune.models import light, minilm, registry  # noqa: E402

RTOL = 1e-4


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_close(outputs, references):
    """Max abs error within RTOL of the reference's largest magnitude (robust near zero)."""
    assert len(outputs) == len(references)
    for out, ref in zip(outputs, references):
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= RTOL * max(np.abs(ref).max(), 1e-6)


def _dim0(value_info):
    return value_info.type.tensor_type.shape.dim[0]


def _with_batch(feeds, batch):
    return {name: np.concatenate([v] * batch)[:batch] for name, v in feeds.items()}


@pytest.mark.parametrize("name", registry.names())
def test_zoo_model(name):
    zm = registry.load(name)
    onnx.checker.check_model(zm.model, full_check=True)
    onnx.shape_inference.infer_shapes(zm.model, strict_mode=True)
    assert list(zm.input_shapes) == [i.name for i in zm.model.graph.input]

    session, feeds = _session(zm.model), zm.make_feeds(0)
    outputs = session.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outputs)
    if zm.reference is not None:
        _assert_close(outputs, zm.reference(feeds))

    if zm.source != "light":  # exports keep a symbolic batch axis; light models are static
        for value in [*zm.model.graph.input, *zm.model.graph.output]:
            dim = _dim0(value).dim_param  # tf2onnx names it unk__N
            assert dim == "batch" or zm.source == "keras" and dim, value.name
        bigger = _with_batch(feeds, 3)
        assert session.run(None, bigger)[0].shape[0] == 3


TEXT_MODELS = [
    name for name in registry.names(family="transformer") if "attention_mask" in registry.load(name).input_specs
]


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_attention_mask_is_live(name):
    zm = registry.load(name)
    feeds = zm.make_feeds(1)
    unmasked = _session(zm.model).run(None, feeds)
    feeds["attention_mask"][0, -5:] = 0
    masked = _session(zm.model).run(None, feeds)
    assert not np.allclose(masked[0][0], unmasked[0][0])
    _assert_close(masked, zm.reference(feeds))


def test_minilm_dynamic_sequence_on_real_text():
    sentences = minilm.sample_sentences()
    assert len(sentences) >= 24 and all(len(s.split()) >= 4 for s in sentences)
    zm = registry.load("minilm")
    feeds = minilm.tokenize(sentences[:3], seq_len=24)
    assert feeds["input_ids"].shape == (3, 24) and feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"].min() == 0  # short sentences are padded
    _assert_close(_session(zm.model).run(None, feeds), zm.reference(feeds))


@pytest.mark.parametrize("name", light.light_names())
def test_light_raw_inputs(name):
    raw, raw_shapes = light.load_light(name, fold=False)
    initializers = {i.name for i in raw.graph.initializer}
    assert raw.ir_version == 3 and initializers <= {i.name for i in raw.graph.input}
    assert len(raw_shapes) == 1 and next(iter(raw_shapes.values())) == (1, 3, 224, 224)
    assert registry.load("light_" + name).input_shapes == raw_shapes


def test_randomize_weights_is_seeded():
    folded, _ = light.load_light("squeezenet")
    arrays = lambda m: [onnx.numpy_helper.to_array(i) for i in m.graph.initializer]  # noqa: E731
    a, b, c = (arrays(light.randomize_weights(folded, s)) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert all(x.std() > 0 for x in a if x.ndim >= 1 and x.size > 1)  # no constant weights left


def test_names_filters():
    everything = registry.names()
    assert set().union(*(registry.names(family=f) for f in ("cnn", "transformer", "recurrent"))) == set(everything)
    assert registry.names(family="recurrent") == ["speech_tagger"]
    assert registry.names(source="light") == ["light_" + n for n in light.light_names()]
    assert registry.names(source="pretrained") == ["minilm"]
    with pytest.raises(KeyError):
        registry.load("no_such_model")


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path))
    first = registry.build_model("resnet_basic")
    assert len(list(tmp_path.glob("resnet_basic-*.onnx"))) == 1
    assert registry.build_model("resnet_basic").SerializeToString() == first.SerializeToString()


def test_load_returns_private_copy():
    registry.load("vit").model.graph.ClearField("node")
    assert len(registry.load("vit").model.graph.node) > 0


@pytest.mark.parametrize("name", [n for n in registry.names("transformer")] + ["unet"])
def test_canonical_model_keeps_its_dynamic_batch(name):
    """Shape computations folded by canonicalization must not bake in the analysis batch: inputs
    sharing the batch dim are varied together (they used to be varied one input at a time, which
    failed and folded batch-dependent Reshape targets)."""
    from onnx_prune.passes.canonicalize import canonicalize

    zm = registry.load(name)
    canon = canonicalize(zm.model, input_shapes=dict(zm.input_shapes))
    feeds = {k: np.concatenate([v] * 3) for k, v in zm.make_feeds(0).items()}  # another batch size
    _assert_close(_session(canon.model).run(None, feeds), _session(zm.model).run(None, feeds))
