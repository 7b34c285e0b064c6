"""`python -m jaxfm.finetune` (NER) on 2 processes x 4 devices equals 1 process x 8 devices,
fully and with LoRA on a data x fsdp x tensor mesh.

Entity F1 needs every dev prediction: the eval step's replicated outputs give each host the
whole global batch, so the score is computed over the whole dev set, not per host.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from tests import finetune_fixtures as ff
from tests.multihost import harness as h


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
  root = tmp_path_factory.mktemp("mh-finetune")
  model_dir = ff.write_model_dir(root)
  train, dev = ff.write_conll(root, n_train=96, n_dev=37)  # 37: uneven over 2 hosts and batch 16
  argv = [sys.executable, "-m", "jaxfm.finetune", "--config=configs/finetune/conll2003.py",
          f"--config.init_from={model_dir}", f"--config.data.train_file={train}",
          f"--config.data.dev_file={dev}", f"--config.data.max_seq_length={ff.SEQ}",
          "--config.data.length_buckets=8,16",  # every host must cut its rows alike
          "--config.train.batch_size=16", "--config.train.epochs=2",
          "--config.train.progress_bar=false", "--config.optim.peak_learning_rate=1e-3"]
  return root, argv


def _run(files, num_processes: int, devices: int, *overrides: str) -> dict:
  root, argv = files
  name = f"ner-{num_processes}x{devices}" + ("-lora" if overrides else "")
  with h.launched([*argv, *overrides, f"--workdir={root / name}"], num_processes, devices, root,
                  name) as group:
    group.wait()
  lines = [l for l in group.logs[0].read_text().splitlines() if l.startswith('{"step"')]
  assert len(lines) == 1, group.tails()
  assert all('{"step"' not in log.read_text() for log in group.logs[1:])  # process 0 reports
  return json.loads(lines[0])


def test_two_process_fine_tuning_scores_like_one_process(files):
  two, one = _run(files, 2, 4), _run(files, 1, 8)
  assert two["step"] == one["step"] == 12  # 96 examples x 2 epochs / batch 16
  for key in ("loss", "f1", "precision", "recall"):
    np.testing.assert_allclose(two["dev"][key], one["dev"][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert 0.1 < two["dev"]["f1"] < 1  # part-trained: F1 is not saturated, so equality says something


def test_two_process_lora_fine_tuning_scores_like_one_process(files):
  # LoRA A/B shard on the kernels' axes: fsdp and tensor split them across the two hosts.
  lora = ("--config.peft.method=lora", "--config.peft.rank=4",
          "--config.peft.target_modules=query,value,attention.output,intermediate",
          "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
          "--config.optim.peak_learning_rate=1e-2")
  two, one = _run(files, 2, 4, *lora), _run(files, 1, 8, *lora)
  assert two["step"] == one["step"] == 12
  for key in ("loss", "f1"):
    np.testing.assert_allclose(two["dev"][key], one["dev"][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  saved = json.loads((files[0] / "ner-2x4-lora" / "config.json").read_text())["config"]
  assert saved["peft"]["method"] == "lora" and saved["mesh"]["tensor"] == 2
