"""`core.tfrecord`: framing checks and the tf.train.Example parser agree with TensorFlow's."""

import pytest
from tensorflow.core.example import example_pb2

from core import tfrecord as tfr
from tests import corpus


def test_framing_of_a_written_record():
    frame = corpus.tfrecord_frame(b"payload")
    assert tfr.check_header(frame[:12]) == (None, 7)
    assert tfr.check_data(frame[12:19], 7, frame[19:]) is None
    assert tfr.check_header(b"\x01" + frame[1:12])[0] == "length CRC mismatch"
    assert tfr.check_data(b"paylOad", 7, frame[19:]) == "data CRC mismatch"
    assert tfr.check_data(b"pay", 7, b"") == "truncated record (3 of 7 data bytes)"


def test_example_features_match_tensorflow():
    example = example_pb2.Example()
    feature = example.features.feature
    feature["image/encoded"].bytes_list.value.extend([b"\x00\xffjpeg", b"second"])
    feature["image/key"].bytes_list.value.append("clé".encode())
    feature["ids"].int64_list.value.extend([3, -1, 1 << 40])
    feature["floats"].float_list.value.extend([0.5, 2.0])
    feature["empty"].bytes_list.value.append(b"")
    got = tfr.example_features(example.SerializeToString())
    assert got["image/encoded"] == [b"\x00\xffjpeg", b"second"]
    assert got["ids"] == [3, -1, 1 << 40] and got["floats"] == [] and got["empty"] == [b""]
    assert tfr.example_key(got) == "clé"


@pytest.mark.parametrize(
    "features, key",
    [
        ({"image/source_id": [b"src"]}, "src"),
        ({"image/key": [b""], "image/filename": [b"f.jpg"]}, "f.jpg"),
        ({"image/key": [7]}, "7"),
        ({"other": [b"x"]}, None),
    ],
)
def test_example_key_reads_the_features_the_job_reads(features, key):
    assert tfr.example_key(features) == key


@pytest.mark.parametrize("data", [b"\x0a\x05abc", b"\x0a", b"\x0f\x00", b"\x0a\x02\x0a\x09"])
def test_damaged_examples_are_value_errors(data):
    with pytest.raises(ValueError):
        tfr.example_features(data)


def test_the_jobs_examples_parse(tmp_path):
    data = corpus.make_example(b"IMG", key="k1", **{"image/format": "jpeg"})
    got = tfr.example_features(data)
    assert got["image/encoded"] == [b"IMG"] and tfr.example_key(got) == "k1"
