"""launch/tpu.sh against a fake gcloud (tests/fake_gcloud: scripted TPU states, ssh that runs on
per-worker home folders, a checkpointing trainer), its dry-run command lines, the runbook's
commands, and launch/local.sh with real processes. No network, no real gcloud."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = ROOT / "launch" / "tpu.sh"
LOCAL_SH = ROOT / "launch" / "local.sh"
FAKE_BIN = ROOT / "tests" / "fake_gcloud"
SCRIPTS = [TPU_SH, LOCAL_SH]
LAUNCHER_VARS = ("SPOT", "QUEUED", "REPO_URL", "PROJECT", "TPU_NAME", "PORT", "JAX_VERSION", "KEEP",
                 "AUTOCHECKPOINT", "DRY_RUN", "DRY_RUN_STATE", "EXTRA_PIP")


def _run(args, env=None, cwd=None, timeout=60):
  full_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
  full_env.update(env or {})
  return subprocess.run(["bash", *map(str, args)], env=full_env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def _dry(*args, **env):
  proc = _run([TPU_SH, *args], env={"DRY_RUN": "1", **env})
  gcloud_lines = [l for l in proc.stdout.splitlines() if l.startswith("+ gcloud ")]
  return proc, gcloud_lines


class FakeCloud:
  """A fake gcloud's state folder, a workdir, and launch/tpu.sh run against them."""

  def __init__(self, tmp_path):
    self.dir = tmp_path / "gcloud"
    self.workdir = tmp_path / "workdir"
    self.lockfile = tmp_path / "libtpu_lockfile"
    self.dir.mkdir()
    self.workdir.mkdir()

  def scenario(self, **scenario):
    (self.dir / "scenario.json").write_text(json.dumps(scenario))

  def tpu_sh(self, *args, timeout=60, **env):
    return _run([TPU_SH, *args], timeout=timeout, env={
        "PATH": f"{FAKE_BIN}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(self.dir),
        "FAKE_PYTHON": sys.executable, "SLEEP_S": "0.2", "LOG_SYNC_S": "2", "STOP_WAIT_S": "5",
        "LIBTPU_LOCKFILE": str(self.lockfile), **env})

  def trainer(self, steps, per_launch, then="sigterm", step_s=0.01):
    return ["python", "tests/fake_gcloud/trainer.py", f"--workdir={self.workdir}", f"--steps={steps}",
            f"--per_launch={per_launch}", f"--then={then}", f"--step_s={step_s}"]

  def preinstall(self, workers=1):
    """Worker disks as `install` leaves them (the project's launcher and test helpers, a venv, the
    marker), made directly to keep tests fast; the install itself is tested elsewhere."""
    for w in range(workers):
      home = self.dir / "workers" / str(w)
      for sub in ("launch", "tests/fake_gcloud"):
        shutil.copytree(ROOT / sub, home / "jaxfm" / sub, ignore=shutil.ignore_patterns("__pycache__"))
      env = dict(os.environ, FAKE_GCLOUD_DIR=str(self.dir), FAKE_WORKER=str(w), FAKE_PYTHON=sys.executable)
      subprocess.run([FAKE_BIN / "uv", "venv", "--python", "3.11", home / "venv-jaxfm"], env=env, check=True)
      (home / "venv-jaxfm" / ".jaxfm-installed").touch()

  def calls(self):
    """Every gcloud call, as one line without the flags that every call has."""
    lines = (self.dir / "calls.jsonl").read_text().splitlines()
    return [" ".join(a for a in json.loads(l) if not a.startswith(("--zone=", "--format=")))
            for l in lines]

  def count(self, needle):
    return sum(needle in c for c in self.calls())

  def installs(self):
    log = self.dir / "uv.log"
    return log.read_text().count(" uv pip install ") if log.exists() else 0

  def starts(self, worker=0):
    """The step each launch of the trainer on `worker` resumed from."""
    lines = (self.workdir / "launches.jsonl").read_text().splitlines()
    return [d["start"] for d in map(json.loads, lines) if d["worker"] == worker]

  def job_file(self, name, worker=0):
    return self.dir / "workers" / str(worker) / "jaxfm-job" / name

  def kill_jobs(self):
    for pid_file in self.dir.glob("workers/*/jaxfm-job/pid"):
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError, PermissionError):
        pass


def _wait_for(condition, timeout_s=20):
  """Whether `condition()` holds within `timeout_s` (checked every 0.1 s)."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.1)
  return True


def _alive(pid):
  """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.fixture
def cloud(tmp_path):
  fake = FakeCloud(tmp_path)
  yield fake
  fake.kill_jobs()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [*SCRIPTS, FAKE_BIN / "worker_bin" / "curl"], ids=lambda p: p.name)
def test_shellcheck(script):
  proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- babysit against the fake gcloud

def test_spot_preemption_recreates_reinstalls_and_resumes(cloud):
  """Two workers; the first launch checkpoints step 5 and the spot TPU is preempted under it."""
  cloud.scenario(workers=2, lives=[["CREATING", "READY"], ["READY"]])
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(10, 5, then="preempt"), SPOT="1", MAX_ATTEMPTS="6")
  assert proc.returncode == 0, proc.stderr
  calls = cloud.calls()
  creates = [c for c in calls if "tpu-vm create" in c]
  assert len(creates) == 2 and all(c.endswith("--spot") for c in creates)
  assert cloud.installs() == 4  # each fresh node, both workers
  assert cloud.count("--command=test -f ~/venv-jaxfm/.jaxfm-installed") == 2  # before each launch
  assert cloud.starts(0) == [0, 5] and len(cloud.starts(1)) == 2
  assert (cloud.workdir / "DONE").read_text() == "step 10\n"
  assert "lost the job: jaxfm-tpu is PREEMPTED" in proc.stderr
  assert calls[-1] == "compute tpus tpu-vm delete jaxfm-tpu --quiet"
  assert cloud.count("tpu-vm delete") == 2  # the preempted node, and the finished one
  logs = sorted(p.name for p in (cloud.workdir / "logs").iterdir())
  assert any(n.endswith("-worker-0.log") for n in logs) and any(n.endswith("-worker-1.log") for n in logs)
  last = (cloud.workdir / "logs" / [n for n in logs if n.endswith("-worker-0.log")][-1]).read_text()
  assert "resuming from step 5" in last and "step 10" in last and "exit 0" in last
  launches = [json.loads(l) for l in (cloud.workdir / "launches.jsonl").read_text().splitlines()]
  assert all(d["distributed"] == "1" and d["cwd"].endswith("/jaxfm") for d in launches)


def test_queued_wait_spends_no_attempts_and_finish_deletes(cloud):
  waiting = ["ACCEPTED"] + ["WAITING_FOR_RESOURCES"] * 12 + ["PROVISIONING", "ACTIVE"]
  cloud.scenario(lives=[waiting])
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(3, 3), QUEUED="1", MAX_ATTEMPTS="2")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("WAITING_FOR_RESOURCES; waiting (no attempt used)") == 12
  assert cloud.count("queued-resources create jaxfm-tpu --node-id=jaxfm-tpu") == 1
  assert cloud.installs() == 1 and cloud.starts() == [0]
  assert cloud.calls()[-1] == "compute tpus queued-resources delete jaxfm-tpu --force --quiet"


def test_sigterm_save_relaunches_on_the_same_node_and_keep_keeps_it(cloud):
  cloud.scenario(initial=["READY"])
  cloud.preinstall()
  proc = cloud.tpu_sh("babysit", "--keep", "--", *cloud.trainer(10, 5, then="sigterm"))
  assert proc.returncode == 0, proc.stderr
  assert "command saved after SIGTERM (exit 143); relaunching" in proc.stderr
  assert cloud.starts() == [0, 5] and cloud.installs() == 0  # the node has the marker
  assert cloud.count("create") == 0 and cloud.count("delete") == 0
  assert "keeping jaxfm-tpu (--keep)" in proc.stderr


def test_exit_0_without_done_is_not_finished_and_giving_up_deletes(cloud):
  cloud.scenario(initial=["READY"])
  cloud.preinstall()
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(10, 2, then="exit0"), MAX_ATTEMPTS="2")
  assert proc.returncode == 1
  assert proc.stderr.count("exit 0 but no") == 2 and "giving up" in proc.stderr
  assert cloud.starts() == [0, 2]
  assert cloud.calls()[-1] == "compute tpus tpu-vm delete jaxfm-tpu --quiet"


def test_install_failure_spends_an_attempt_and_is_retried(cloud):
  cloud.scenario(initial=["READY"], install_fail=[1])
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(2, 2), MAX_ATTEMPTS="3")
  assert proc.returncode == 0, proc.stderr
  assert cloud.installs() == 2 and cloud.starts() == [0], proc.stderr
  assert "attempt 2/3: jaxfm-tpu is READY" in proc.stderr


@pytest.mark.parametrize("start_fails", [False, True])
def test_stopped_node_is_started_or_recreated(cloud, start_fails):
  cloud.scenario(initial=["STOPPED"], start_fails=start_fails, lives=[["READY"]])
  cloud.preinstall()
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(2, 2), MAX_ATTEMPTS="4")
  assert proc.returncode == 0, proc.stderr
  assert cloud.count("tpu-vm start") == 1
  assert cloud.count("tpu-vm create") == int(start_fails)
  assert cloud.installs() == int(start_fails)  # a started VM keeps its disk; a new one is installed
  assert cloud.starts() == [0]


def test_waiting_is_bounded_by_wait_s(cloud):
  cloud.scenario(lives=[["WAITING_FOR_RESOURCES"]])
  began = time.monotonic()
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(2, 2), QUEUED="1", WAIT_S="1", MAX_ATTEMPTS="5")
  assert proc.returncode == 1
  assert time.monotonic() - began < 20
  assert "still WAITING_FOR_RESOURCES after WAIT_S=1s" in proc.stderr and "giving up" in proc.stderr
  assert cloud.count("queued-resources create") == 1
  assert cloud.calls()[-1].startswith("compute tpus queued-resources delete")


def test_failed_queued_resource_is_deleted_and_recreated(cloud):
  cloud.scenario(lives=[["WAITING_FOR_RESOURCES", "FAILED"], ["ACTIVE"]])
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(2, 2), QUEUED="1", MAX_ATTEMPTS="4")
  assert proc.returncode == 0, proc.stderr
  assert cloud.count("queued-resources create") == 2 and cloud.count("queued-resources delete") == 2


def test_failed_polls_on_a_usable_node_do_not_relaunch(cloud):
  cloud.scenario(initial=["READY"], ssh_fail=[3, 4])  # ssh 1: the marker, 2: the launch, then polls
  cloud.preinstall()
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(10, 10, step_s=0.05), SSH_RETRIES="3")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("Connection refused") == 2 and cloud.starts() == [0]


def test_unreachable_worker_relaunches_after_ssh_retries(cloud):
  cloud.scenario(initial=["READY"], ssh_fail=[3, 4, 5])
  cloud.preinstall()
  proc = cloud.tpu_sh("babysit", "--", *cloud.trainer(10, 10, step_s=0.05), SSH_RETRIES="3")
  assert proc.returncode == 0, proc.stderr
  assert "worker 0 unreachable for 3 polls" in proc.stderr
  assert len(cloud.starts()) == 2  # the relaunch stopped the first job (SIGTERM) and resumed


def test_babysit_needs_a_workdir(cloud):
  proc = cloud.tpu_sh("babysit", "--", "python", "-m", "jaxfm.pretrain")
  assert proc.returncode == 2 and "--workdir" in proc.stderr
  assert not (cloud.dir / "calls.jsonl").exists()


# ---------------------------------------------------------------- detached jobs: run, logs, stop

def test_run_is_detached_clears_a_stale_job_and_the_lockfile(cloud):
  cloud.scenario(initial=["READY"])
  cloud.preinstall()
  long_job = cloud.trainer(10_000, 10_000, step_s=0.05)
  began = time.monotonic()
  proc = cloud.tpu_sh("run", "--", *long_job)
  assert proc.returncode == 0, proc.stderr
  assert time.monotonic() - began < 30  # returns while the job (500 s) runs on
  first_pid = int(cloud.job_file("pid").read_text())
  assert _alive(first_pid)
  cloud.lockfile.write_text("held by a dead process")
  assert _wait_for(lambda: (cloud.workdir / "launches.jsonl").exists())  # its SIGTERM handler is set
  assert cloud.tpu_sh("run", "--", *long_job).returncode == 0
  assert not cloud.lockfile.exists()
  assert not _alive(first_pid)
  first_log = sorted(cloud.job_file("").glob("*-worker-0.log"))[0].read_text()
  assert "SIGTERM: saved" in first_log and "exit 143" in first_log
  assert _wait_for(lambda: len(cloud.starts()) == 2)  # the relaunched trainer is up
  assert cloud.starts()[0] == 0 and cloud.starts()[1] > 0  # resumed from the saved step

  assert cloud.tpu_sh("stop").returncode == 0
  assert cloud.job_file("exit_code").read_text().strip() == "143"
  logs = cloud.tpu_sh("logs")
  assert logs.returncode == 0 and "SIGTERM: saved" in logs.stdout and "exit 143" in logs.stdout


def test_logs_follows_the_job_to_its_end(cloud):
  cloud.scenario(initial=["READY"])
  cloud.preinstall()
  assert cloud.tpu_sh("run", "--", *cloud.trainer(20, 20, step_s=0.05)).returncode == 0
  logs = cloud.tpu_sh("logs")
  assert logs.returncode == 0
  assert "step 20" in logs.stdout and "exit 0" in logs.stdout
  assert cloud.job_file("exit_code").read_text().strip() == "0"
  assert (cloud.workdir / "DONE").exists()


# ---------------------------------------------------------------- dry-run command lines

INSTALL = ("set -eo pipefail; rm -f ~/venv-jaxfm/.jaxfm-installed; export PATH=$HOME/.local/bin:$PATH; "
           "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
           "uv venv --allow-existing --python 3.11 ~/venv-jaxfm; "
           "cd ~/jaxfm && uv pip install --python ~/venv-jaxfm -e '.[tpu]'; "
           "~/venv-jaxfm/bin/python -c 'import jax, jaxfm; print(\"jax\", jax.__version__)'; "
           "touch ~/venv-jaxfm/.jaxfm-installed")


def _command(line):
  """The --command=... of a dry-run ssh line, unquoted."""
  return next(w for w in shlex.split(line) if w.startswith("--command="))[len("--command="):]


def test_create_plain_spot_queued_and_autocheckpoint():
  proc, lines = _dry("create", TPU_NAME="t1", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32",
                     RUNTIME_VERSION="tpu-ubuntu2204-base", PROJECT="p1")
  assert proc.returncode == 0, proc.stderr
  assert lines == ["+ gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --project=p1 "
                   "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]
  _, lines = _dry("create", "--autocheckpoint", SPOT="1")
  assert lines == ["+ gcloud alpha compute tpus tpu-vm create jaxfm-tpu --zone=us-west4-a "
                   "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot "
                   "--autocheckpoint-enabled"]
  _, lines = _dry("create", SPOT="1", QUEUED="1", TPU_NAME="q1", AUTOCHECKPOINT="1")
  assert lines[0] == ("+ gcloud alpha compute tpus queued-resources create q1 --node-id=q1 "
                      "--zone=us-west4-a --accelerator-type=v5litepod-8 "
                      "--runtime-version=v2-alpha-tpuv5-lite --spot --autocheckpoint-enabled")
  assert lines[1:] == ["+ gcloud compute tpus queued-resources describe q1 --zone=us-west4-a "
                       "'--format=value(state.state)'"]


def test_install_command_lines():
  proc, lines = _dry("install")
  assert proc.returncode == 0, proc.stderr
  assert _command(lines[0]) == "rm -rf ~/jaxfm"
  assert re.fullmatch(r"\+ gcloud compute tpus tpu-vm scp --recurse /\S+/jaxfm 'jaxfm-tpu:~/' "
                      r"--zone=us-west4-a --worker=all", lines[1])
  assert "--worker=all" in lines[2] and _command(lines[2]) == INSTALL

  _, lines = _dry("install", REPO_URL="https://example.com/jaxfm.git", REPO_REF="v1",
                  JAX_VERSION="0.10.2", EXTRA_PIP="wandb", PYTHON_VERSION="3.12")
  assert _command(lines[0]) == ("rm -rf ~/jaxfm && git clone --depth=1 --branch=v1 "
                                "https://example.com/jaxfm.git ~/jaxfm")
  install = _command(lines[1])
  assert "uv venv --allow-existing --python 3.12 ~/venv-jaxfm;" in install
  assert ("uv pip install --python ~/venv-jaxfm -e '.[tpu]' wandb; "
          "uv pip install --python ~/venv-jaxfm 'jax[tpu]==0.10.2';") in install


def test_run_stop_logs_lines():
  proc, lines = _dry("run", "--", "python", "-m", "jaxfm.pretrain",
                     "--config=configs/pretrain/bert_base.py", "--workdir=gs://bucket/run1")
  assert proc.returncode == 0, proc.stderr
  assert len(lines) == 1 and "--worker=all" in lines[0]
  assert re.fullmatch(r"cd ~/jaxfm && VENV=venv-jaxfm bash launch/tpu.sh worker-start \d{8}T\d{6}Z "
                      r"gs://bucket/run1 -- python -m jaxfm.pretrain "
                      r"--config=configs/pretrain/bert_base.py --workdir=gs://bucket/run1 "
                      r"--config.runtime.platform=tpu", _command(lines[0]))
  _, lines = _dry("stop")
  assert "--worker=all" in lines[0] and _command(lines[0]).endswith("launch/tpu.sh worker-stop")
  _, lines = _dry("logs", WORKER="3")
  assert "--worker=3" in lines[0] and _command(lines[0]).endswith("launch/tpu.sh worker-log")


@pytest.mark.parametrize("command, flags", [
    (["python", "-m", "jaxfm.finetune", "--workdir=gs://b/r"], 1),
    (["python", "-m", "jaxfm.pretrain", "--config.runtime.platform=auto"], 0),
    (["python", "-m", "jaxfm.evaluate", "--workdir=gs://b/r"], 0),
])
def test_run_asks_trainers_for_the_tpu(command, flags):
  proc, lines = _dry("run", "--", *command)
  assert proc.returncode == 0, proc.stderr
  assert lines[0].count("--config.runtime.platform=tpu") == flags


def test_delete_start_status_lines():
  _, lines = _dry("delete")
  assert lines == ["+ gcloud compute tpus tpu-vm delete jaxfm-tpu --zone=us-west4-a --quiet"]
  _, lines = _dry("delete", QUEUED="1")
  assert lines == ["+ gcloud compute tpus queued-resources delete jaxfm-tpu --zone=us-west4-a --force --quiet"]
  _, lines = _dry("start")
  assert lines == ["+ gcloud compute tpus tpu-vm start jaxfm-tpu --zone=us-west4-a"]
  proc, lines = _dry("status", DRY_RUN_STATE="READY")
  assert proc.stdout.splitlines()[-1] == "READY" and "describe" in lines[0]


def test_babysit_dry_run_walks_one_recovery():
  proc, lines = _dry("babysit", "--", "python", "-m", "jaxfm.pretrain", "--workdir=gs://b/r", SPOT="1")
  assert proc.returncode == 0, proc.stderr
  steps = [" ".join(l.split()[5:7]) if "ssh" not in l else _command(l).removeprefix("cd ~/jaxfm && ")[:40]
           for l in lines]
  assert steps == ["describe jaxfm-tpu", "delete jaxfm-tpu", "create jaxfm-tpu", "describe jaxfm-tpu",
                   "test -f ~/venv-jaxfm/.jaxfm-installed", "rm -rf ~/jaxfm", "scp --recurse",
                   INSTALL[:40], "VENV=venv-jaxfm bash launch/tpu.sh worke",
                   "VENV=venv-jaxfm bash launch/tpu.sh worke", "delete jaxfm-tpu"]
  assert lines[2].endswith("--spot") and "worker-start" in lines[8] and "worker-status gs://b/r" in lines[9]


@pytest.mark.parametrize("args, env, message", [
    (["create"], {"SPOT": "yes"}, "SPOT must be 0 or 1"),
    (["create"], {"WAIT_S": "1h"}, "WAIT_S must be a whole number"),
    (["install"], {"VENV": "my venv"}, "VENV must be a plain name"),
    (["babysit", "--", "python", "-m", "jaxfm.pretrain"], {}, "needs --workdir"),
])
def test_bad_settings_name_the_variable(args, env, message):
  proc, lines = _dry(*args, **env)
  assert proc.returncode == 2 and message in proc.stderr and not lines


@pytest.mark.parametrize("args", [[], ["bogus"], ["run"], ["run", "--"], ["babysit"], ["create", "x"],
                                  ["babysit", "--keep"], ["logs", "x"]])
def test_usage_exit_2(args):
  proc, lines = _dry(*args)
  assert proc.returncode == 2
  assert "launch/tpu.sh" in proc.stderr
  assert not lines


# ---------------------------------------------------------------- the runbook's commands

def _runbook_commands():
  """Each `launch/tpu.sh` command of launch/README.md's bash blocks, with the exports before it."""
  text = (ROOT / "launch" / "README.md").read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    exports = []
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line.startswith("export "):
        exports.append(line)
      for part in line.split(" && "):
        if "launch/tpu.sh" in part:
          commands.append("; ".join([*exports, part]))
  return commands


RUNBOOK = _runbook_commands()


def test_runbook_has_commands():
  verbs = {c.split("launch/tpu.sh ")[1].split()[0] for c in RUNBOOK}
  assert {"create", "install", "run", "logs", "stop", "babysit", "status", "delete"} <= verbs


@pytest.mark.parametrize("command", RUNBOOK)
def test_runbook_command_dry_runs(command):
  env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
  proc = subprocess.run(["bash", "-c", f"set -euo pipefail; export DRY_RUN=1; {command}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert any(l.startswith("+ gcloud compute tpus ") or l.startswith("+ gcloud alpha compute tpus ")
             for l in proc.stdout.splitlines())


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
