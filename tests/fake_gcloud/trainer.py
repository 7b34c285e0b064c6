"""A trainer stand-in that tests/test_launch.py runs on fake TPU workers, shaped like jaxfm's.

  python tests/fake_gcloud/trainer.py --workdir=DIR --steps=N --per_launch=K --then=WHAT [--step_s=S]

Worker 0 resumes from DIR/ckpt (the step it holds), trains up to K steps (each saved to DIR/ckpt),
and writes DIR/DONE when it reaches N, exiting 0. If it stops short of N it does WHAT:
`preempt` (the fake gcloud makes the TPU PREEMPTED and kills the job), `sigterm` (exit 143, a
preemption save), `exit0` (exit 0 without DONE). SIGTERM at any time: exit 143. Like jaxfm, a
launch first removes DIR/DONE. Every launch appends one JSON line to DIR/launches.jsonl; the other
workers only record theirs.
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--per_launch", type=int, required=True)
  parser.add_argument("--then", choices=["preempt", "sigterm", "exit0"], default="sigterm")
  parser.add_argument("--step_s", type=float, default=0.01)
  args = parser.parse_args()
  signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM: saved", flush=True), sys.exit(143)))
  workdir = pathlib.Path(args.workdir)
  worker = int(os.environ["FAKE_WORKER"])
  ckpt = workdir / "ckpt"
  start = int(ckpt.read_text()) if ckpt.exists() else 0
  with open(workdir / "launches.jsonl", "a") as f:
    f.write(json.dumps({"worker": worker, "start": start, "cwd": os.getcwd(),
                        "distributed": os.environ.get("JAXFM_DISTRIBUTED")}) + "\n")
  if worker != 0:
    return
  (workdir / "DONE").unlink(missing_ok=True)
  print(f"resuming from step {start}", flush=True)
  step = start
  while step < min(args.steps, start + args.per_launch):
    time.sleep(args.step_s)
    step += 1
    (workdir / "ckpt.tmp").write_text(str(step))
    (workdir / "ckpt.tmp").rename(ckpt)
    print(f"step {step}", flush=True)
  if step >= args.steps:
    (workdir / "DONE").write_text(f"step {step}\n")
    return
  if args.then == "preempt":
    subprocess.run([os.environ["FAKE_GCLOUD"], "_preempt"], check=True)
    time.sleep(60)  # the fake gcloud kills this process group first
  sys.exit(143 if args.then == "sigterm" else 0)


if __name__ == "__main__":
  main()
