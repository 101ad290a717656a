"""Which buffers make an optimizer step's transient memory (compile only).

For each optimizer spec (as in ``scripts/bench_scale.py``: ``name`` or
``name:key=value``), compiles one step (update + ``optax.apply_updates``,
params and state donated) of a model tree from abstract shapes, so nothing of
the model's size is allocated, and reports XLA's ``memory_analysis()``: the
temp buffer (what ``bench_scale.py`` measures as the transient: peak minus
params, grads and state), the fusion count, and, from XLA's buffer
assignment, the largest values that live in the temp buffer (their HLO
instruction, shape and size), which names the culprit: a stacked copy of the
gradients, an update materialized before ``apply_updates``, ...

Each spec compiles in a fresh process with ``--xla_dump_to`` set to its own
folder under ``--dump`` (kept with ``--keep_dumps``, for reading the
optimized HLO); one JSON line per spec goes to ``--out``.

    python scripts/xla_memory.py --model=llama1b hfac hfac:stack_leaves=False
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_ALLOCATION = re.compile(r'^allocation (\d+): size (\d+)(.*)$')
_VALUE = re.compile(r'^\s+value: <\d+ ([^ >]+)[^>]*> \(size=(\d+),offset=(\d+)\):'
                    r' (.*)$')


def temp_values(text: str, top: int):
  """The largest values of the temp allocations of a buffer assignment.

  Args:
    text: XLA's ``*buffer-assignment.txt``.
    top: how many values to return.

  Returns:
    (temp allocation bytes, [(instruction, bytes, offset, shape), ...]) with
    the values sorted by size, largest first.
  """
  total, values, in_temp = 0, [], False
  for line in text.splitlines():
    m = _ALLOCATION.match(line)
    if m:
      in_temp = 'preallocated-temp' in m.group(3)
      if in_temp:
        total += int(m.group(2))
      continue
    m = _VALUE.match(line)
    if m and in_temp:
      values.append((m.group(1), int(m.group(2)), int(m.group(3)),
                     m.group(4)))
  values.sort(key=lambda v: -v[1])
  return total, values[:top]


def worker(model: str, dtype: str, spec: str):
  """Compiles one step of ``spec`` and prints a JSON line of its memory."""
  sys.path.insert(0, HERE)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import bench_scale  # pylint: disable=import-outside-toplevel

  # A program from the persistent compilation cache is not compiled, so XLA
  # would write no buffer assignment to read.
  jax.config.update('jax_enable_compilation_cache', False)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)),
                        bench_scale.tree_shapes(model),
                        is_leaf=lambda x: isinstance(x, tuple))
  tx = bench_scale.build(spec, 1e-3)
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile()
  ma = compiled.memory_analysis()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  entry = compiled.as_text().split('ENTRY', 1)[-1]
  print(json.dumps({
      'model': model, 'dtype': dtype, 'optimizer': spec,
      'device_kind': jax.devices()[0].device_kind,
      'param_bytes': param_bytes, 'state_bytes': state_bytes,
      'temp_bytes': int(ma.temp_size_in_bytes),
      'temp_vs_params': ma.temp_size_in_bytes / param_bytes,
      'output_bytes': int(ma.output_size_in_bytes),
      'alias_bytes': int(ma.alias_size_in_bytes),
      'kernels': sum(1 for line in entry.splitlines()
                     if ' fusion(' in line or 'custom-call(' in line),
  }), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('specs', nargs='+')
  p.add_argument('--model', default='llama1b')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--top', type=int, default=8)
  p.add_argument('--out', default=None, help='JSON lines file (appended)')
  p.add_argument('--dump', default=None, help='folder for the XLA dumps')
  p.add_argument('--keep_dumps', action='store_true')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    worker(args.model, args.dtype, args.specs[0])
    return 0
  dump_root = args.dump or tempfile.mkdtemp(prefix='xla_memory_')
  for spec in args.specs:
    folder = os.path.join(dump_root, re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec))
    env = dict(os.environ, XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={folder}'
        ' --xla_dump_hlo_module_re=.*jit_step.*').strip())
    run = subprocess.run(
        [sys.executable, __file__, '--worker', f'--model={args.model}',
         f'--dtype={args.dtype}', spec], env=env, capture_output=True,
        text=True, check=False)
    lines = [l for l in run.stdout.splitlines() if l.startswith('{')]
    if run.returncode or not lines:
      record = {'model': args.model, 'dtype': args.dtype, 'optimizer': spec,
                'error': run.stderr[-2000:]}
    else:
      record = json.loads(lines[-1])
      found = sorted(glob.glob(os.path.join(
          folder, '*after_optimizations-buffer-assignment.txt')))
      if found:
        with open(found[-1]) as f:
          total, values = temp_values(f.read(), args.top)
        record['assigned_temp_bytes'] = total
        record['largest_temp_values'] = [
            {'instruction': n, 'bytes': b, 'offset': o, 'shape': s}
            for n, b, o, s in values]
    print(json.dumps(record), flush=True)
    if 'error' not in record:
      print(f'# {spec}: temp {record["temp_bytes"] / 2**20:.1f} MiB '
            f'({record["temp_vs_params"]:.1%} of params), '
            f'{record["kernels"]} kernels', file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if not args.keep_dumps:
      shutil.rmtree(folder, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
