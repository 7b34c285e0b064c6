"""XLA:CPU thunks of a compiled step: the kind of each HLO op, and their traced times."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(?[^ ]*\)?) ")  # name, type
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
OTHER = "other (elementwise, reductions)"  # also the kind of ops missing from the HLO text


def op_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the kind its thunk is counted under."""
  kinds = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match.group(1) in kinds:
      continue
    name, type_ = match.groups()
    shapes = _SHAPE.findall(type_)  # [(dtype, dims)], several for a tuple
    rank = len(shapes[0][1].split(",")) if shapes and shapes[0][1] else 0
    if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
      kind = "GEMM, dense" if rank <= 2 else "GEMM, batched (attention)"
    elif any(dtype == "u32" for dtype, _ in shapes) or name.startswith("while"):
      kind = "random bits (dropout)"
    elif name.startswith(("copy", "transpose")):
      kind = "copy / transpose"
    else:
      kind = OTHER
    kinds[name] = kind
  return kinds


def thunk_times(trace_dir: str) -> collections.Counter:
  """Microseconds per HLO op over the trace (XLA:CPU thunk events)."""
  path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  times = collections.Counter()
  for event in events:
    op = (event.get("args") or {}).get("hlo_op")
    if event.get("ph") == "X" and op:
      times[op] += event.get("dur", 0)
  return times
