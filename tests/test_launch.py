"""launch/tpu.sh (dry-run only: no TPU or gcloud calls) and launch/local.sh (real processes)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = ROOT / "launch" / "tpu.sh"
LOCAL_SH = ROOT / "launch" / "local.sh"
SCRIPTS = [TPU_SH, LOCAL_SH]


def _run(args, env=None, cwd=None, timeout=60):
  full_env = {k: v for k, v in os.environ.items()
              if k not in ("SPOT", "QUEUED", "REPO_URL", "PROJECT", "TPU_NAME", "PORT", "JAX_VERSION")}
  full_env.update(env or {})
  return subprocess.run(["bash", *map(str, args)], env=full_env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def _dry(*args, **env):
  proc = _run([TPU_SH, *args], env={"DRY_RUN": "1", **env})
  gcloud_lines = [l for l in proc.stdout.splitlines() if l.startswith("+ gcloud ")]
  return proc, gcloud_lines


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_plain_spot_and_queued():
  proc, lines = _dry("create", TPU_NAME="t1", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32",
                     RUNTIME_VERSION="tpu-ubuntu2204-base", PROJECT="p1")
  assert proc.returncode == 0, proc.stderr
  assert len(lines) == 1
  line = lines[0]
  assert line.startswith("+ gcloud compute tpus tpu-vm create t1 ")
  for flag in ("--zone=us-central2-b", "--project=p1", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base"):
    assert flag in line
  assert "--spot" not in line

  _, lines = _dry("create", SPOT="1")
  assert "tpu-vm create" in lines[0] and lines[0].endswith(" --spot")

  _, lines = _dry("create", SPOT="1", QUEUED="1", TPU_NAME="q1")
  assert lines[0].startswith("+ gcloud compute tpus queued-resources create q1 ")
  assert "--node-id=q1" in lines[0] and "--runtime-version=" in lines[0] and "--spot" in lines[0]
  assert any("queued-resources describe q1" in l for l in lines[1:])


def test_install_copies_tree_or_clones_on_all_workers():
  proc, lines = _dry("install")
  assert proc.returncode == 0, proc.stderr
  assert any("tpu-vm scp --recurse" in l and "--worker=all" in l for l in lines)
  ssh = [l for l in lines if "tpu-vm ssh" in l]
  assert ssh and all("--worker=all" in l for l in ssh)
  assert "-e '\\''.[tpu]'\\''" in ssh[-1] or "-e '.[tpu]'" in ssh[-1]

  _, lines = _dry("install", REPO_URL="https://example.com/jaxfm.git", JAX_VERSION="0.10.2")
  assert not any("scp" in l for l in lines)
  assert any("git clone" in l and "https://example.com/jaxfm.git" in l for l in lines)
  assert "jax[tpu]==0.10.2" in lines[-1]


def test_run_same_command_on_all_workers_with_log():
  proc, lines = _dry("run", "--", "python", "-m", "jaxfm.pretrain",
                     "--config=configs/pretrain/bert_base.py", "--workdir=gs://bucket/run1")
  assert proc.returncode == 0, proc.stderr
  assert len(lines) == 1
  line = lines[0]
  assert "tpu-vm ssh" in line and "--worker=all" in line
  assert ("python -m jaxfm.pretrain --config=configs/pretrain/bert_base.py "
          "--workdir=gs://bucket/run1 --config.runtime.platform=tpu") in line
  assert "tee -a logs/" in line


@pytest.mark.parametrize("command, flags", [
    (["python", "-m", "jaxfm.finetune", "--workdir=gs://b/r"], 1),
    (["python", "-m", "jaxfm.pretrain", "--config.runtime.platform=auto"], 0),
    (["pkill", "-TERM", "-f", "^python -m jaxfm"], 0),
])
def test_run_asks_trainers_for_the_tpu(command, flags):
  proc, lines = _dry("run", "--", *command)
  assert proc.returncode == 0, proc.stderr
  assert lines[0].count("--config.runtime.platform=tpu") == flags


def test_logs_and_delete():
  _, lines = _dry("logs")
  assert len(lines) == 1 and "tpu-vm scp --recurse" in lines[0] and "--worker=all" in lines[0]
  _, lines = _dry("delete")
  assert lines == ["+ gcloud compute tpus tpu-vm delete jaxfm-tpu --zone=us-west4-a --quiet"]
  _, lines = _dry("delete", QUEUED="1")
  assert "queued-resources delete" in lines[0] and "--force" in lines[0]


def test_babysit_dry_run_single_iteration():
  proc, lines = _dry("babysit", "--", "python", "-m", "jaxfm.pretrain", "--workdir=gs://b/r",
                     SPOT="1", MAX_ATTEMPTS="5", SLEEP_S="999")
  assert proc.returncode == 0, proc.stderr
  verbs = [" ".join(l.split()[5:7]) for l in lines]
  # PREEMPTED (the dry-run default) -> delete, create, install, run: once.
  assert verbs[0] == "describe jaxfm-tpu" and verbs[1] == "delete jaxfm-tpu"
  assert verbs[2] == "create jaxfm-tpu" and "--spot" in lines[2]
  assert sum("jaxfm.pretrain" in l for l in lines) == 1 and "jaxfm.pretrain" in lines[-1]

  _, lines = _dry("babysit", "--", "true", DRY_RUN_STATE="READY")
  assert len(lines) == 2 and "describe" in lines[0] and "tpu-vm ssh" in lines[1]


def test_babysit_reruns_a_preemption_save_and_stops_when_finished(tmp_path):
  """A fake gcloud: the TPU is READY; the first run exits 143 (saved after SIGTERM), the next 0."""
  calls = tmp_path / "calls"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$*" in
  *describe*) echo READY ;;
  *ssh*) [ "$(grep -c ' ssh ' {calls})" = 1 ] && exit 143; exit 0 ;;
esac
""")
  fake.chmod(0o755)
  proc = _run([TPU_SH, "babysit", "--", "python", "-m", "jaxfm.pretrain", "--workdir=gs://b/r"],
              env={"PATH": f"{fake.parent}:{os.environ['PATH']}", "SLEEP_S": "0",
                   "MAX_ATTEMPTS": "3"})
  assert proc.returncode == 0, proc.stderr
  assert "saved after SIGTERM (exit 143); relaunching" in proc.stderr
  assert "command exited 0: finished" in proc.stderr
  assert calls.read_text().count(" ssh ") == 2


@pytest.mark.parametrize("args", [[], ["bogus"], ["run"], ["run", "--"], ["babysit"], ["create", "x"]])
def test_usage_exit_2(args):
  proc, lines = _dry(*args)
  assert proc.returncode == 2
  assert "usage" in proc.stderr.lower() or "launch/tpu.sh" in proc.stderr
  assert not lines


def test_local_two_processes_see_their_env(tmp_path):
  code = ("import os, pathlib; e = os.environ; "
          "pathlib.Path('env-' + e['JAX_PROCESS_ID']).write_text("
          "'|'.join([e['JAX_PROCESS_ID'], e['JAX_NUM_PROCESSES'], e['JAX_COORDINATOR_ADDRESS'], "
          "e['JAX_PLATFORMS']]))")
  proc = _run([LOCAL_SH, "2", "--", sys.executable, "-c", code], cwd=tmp_path, env={"PORT": "12345"})
  assert proc.returncode == 0, proc.stderr
  for i in range(2):
    assert (tmp_path / f"env-{i}").read_text() == f"{i}|2|127.0.0.1:12345|cpu"
    assert (tmp_path / "logs" / f"local-{i}.log").exists()


def test_local_picks_a_free_port(tmp_path):
  code = "import os; print(os.environ['JAX_COORDINATOR_ADDRESS'])"
  proc = _run([LOCAL_SH, "2", "--", sys.executable, "-c", code], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  addrs = {(tmp_path / "logs" / f"local-{i}.log").read_text().strip() for i in range(2)}
  assert len(addrs) == 1 and addrs.pop().startswith("127.0.0.1:")


def test_local_one_failure_stops_the_rest(tmp_path):
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(60)")
  proc = _run([LOCAL_SH, "2", "--", sys.executable, "-c", code], cwd=tmp_path, timeout=30)
  assert proc.returncode == 3, proc.stderr
  assert "process 1 exited 3" in proc.stderr


def test_local_timeout_and_usage(tmp_path):
  proc = _run([LOCAL_SH, "2", "--", "sleep", "60"], cwd=tmp_path, env={"TIMEOUT_S": "1"}, timeout=30)
  assert proc.returncode == 124
  assert _run([LOCAL_SH, "x", "--", "true"], cwd=tmp_path).returncode == 2
  assert _run([LOCAL_SH, "2", "--"], cwd=tmp_path).returncode == 2
