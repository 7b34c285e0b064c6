"""tensorflow-datasets inputs for real: a small ArrayRecord dataset prepared here by tfds itself
(no TensorFlow installed), read through `tfds.data_source` by the corpus and task readers."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from jaxfm.data.corpus import CorpusCounters, CorpusSpec, read_documents
from jaxfm.tasks import classification

DOCUMENTS = [f"document {i} first sentence.\nits second line {i}." for i in range(7)] + ["   "]
SENTENCES = [("a good film", 1), ("a bad plot", 0), ("very nice", 1)]


class JaxfmTestCorpus(tfds.core.GeneratorBasedBuilder):
  """Eight 'documents' (the last one blank) in a `text` feature."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, text in enumerate(DOCUMENTS):
      yield i, {"text": text}


class JaxfmTestGlue(tfds.core.GeneratorBasedBuilder):
  """GLUE-shaped: `sentence` and a two-class `label`."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i, (sentence, label) in enumerate(SENTENCES):
      yield i, {"sentence": sentence, "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  for builder in (JaxfmTestCorpus, JaxfmTestGlue):
    builder(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def test_pretraining_corpus_from_tfds(data_dir):
  counters = CorpusCounters()
  docs = list(read_documents(CorpusSpec(format="tfds", tfds_name="jaxfm_test_corpus",
                                        tfds_data_dir=data_dir), counters))
  expected = sorted(DOCUMENTS[:-1])
  assert sorted("\n".join(d) for d in docs) == expected  # every record, split into its lines
  assert counters.text_lines == 7 and counters.empty_records == 1
  assert counters.lines_total() == len(DOCUMENTS) and counters.documents == 7


def test_classification_examples_from_tfds(data_dir):
  examples = classification.read_tfds("jaxfm_test_glue", "validation", data_dir=data_dir)
  assert sorted((e.text_a, e.label) for e in examples) == sorted(
      (s, str(label)) for s, label in SENTENCES)
  with pytest.raises(ValueError, match="unknown label '1'"):
    classification.read_tfds("jaxfm_test_glue", "validation", data_dir=data_dir,
                             label_names=["0"])
