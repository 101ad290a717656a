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

It also counts the bytes each kernel of the optimized step reads and writes
(:func:`hlo_traffic`, a static count from the HLO: ``hlo_bytes``, against the
ideal step's 3 x params + 2 x state bytes as ``hlo_vs_ideal``), and lists the
kernels that move the most (``largest_kernels``, with the jax op each came
from): where a step moves more than its byte floor, this says which pass of
which tensor it is.

Each spec compiles in a fresh process with ``--xla_dump_to`` set to its own
folder under ``--dump`` (kept with ``--keep_dumps``, for reading the
optimized HLO); one JSON line per spec goes to ``--out``.

    python scripts/xla_memory.py --model=llama1b hfac hfac:stack_leaves=False
"""

from __future__ import annotations

import argparse
import glob
import json
import math
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


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's4': 0.5, 'u4': 0.5,
                'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8,
                'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{$')
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
         'after-all', 'opt-barrier', 'partition-id', 'replica-id',
         'get-dimension-size', 'add-dependency'}


def type_bytes(text: str) -> int:
  """Bytes of an HLO type string (an array or a tuple of arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return int(total)


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f'unbalanced HLO line: {text[:80]}')


def parse_instruction(line: str):
  """(name, type, opcode, operand names, attributes) of one HLO line, or None."""
  body = line.strip()
  if body.startswith('ROOT '):  # computations() records the root's name
    body = body[5:]
  name, sep, rest = body.partition(' = ')
  if not sep or ' ' in name:
    return None
  if rest.startswith('('):
    end = _closing(rest, 0)
    type_str, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    type_str, _, rest = rest.partition(' ')
  opcode, paren, rest = rest.partition('(')
  if not paren:
    return None
  end = _closing('(' + rest, 0) - 1
  operands = [tok for tok in re.findall(r'%?([\w.\-]+)(?=,|$)',
                                        rest[:end].replace(' ', ''))]
  return name.lstrip('%'), type_str, opcode, operands, rest[end + 1:]


def computations(text: str) -> dict:
  """``{computation name: [parsed instructions]}`` and the entry's name.

  Each computation's ROOT instruction comes first in its list, the others
  follow in the text's order.
  """
  comps, roots, current, entry = {}, {}, None, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    if current is not None:
      parsed = parse_instruction(line)
      if parsed:
        if line.lstrip().startswith('ROOT '):
          roots[current] = parsed[0]
        comps[current].append(parsed)
  # The root first: _fusion_write_bytes reads it from there.
  for name, root in roots.items():
    comps[name].sort(key=lambda inst, root=root: inst[0] != root)
  return comps, entry


def _param_read_bytes(comp: list, index: int, full: int) -> int:
  """Bytes a fused computation reads of its parameter ``index``.

  Full size, unless every use (through bitcasts) is a slice (then the slices'
  bytes) or the in-place operand of a dynamic-update-slice (then nothing).
  """
  users = {}
  for name, _, opcode, operands, _ in comp:
    for k, operand in enumerate(operands):
      users.setdefault(operand, []).append((name, opcode, k))
  types = {name: t for name, t, *_ in comp}
  name = next((n for n, _, op, ops, _ in comp
               if op == 'parameter' and ops == [str(index)]), None)
  if name is None:
    return full

  def read(value):
    total = 0
    for user, opcode, k in users.get(value, []):
      if opcode == 'bitcast':
        sub = read(user)
        if sub is None:
          return None
        total += sub
      elif opcode in ('slice', 'dynamic-slice') and k == 0:
        total += type_bytes(types[user])
      elif opcode == 'dynamic-update-slice' and k == 0:
        continue
      else:
        return None
    return total

  got = read(name)
  return full if got is None else min(got, full)


def _fusion_write_bytes(comp: list, out_type: str) -> int:
  """Bytes a fusion writes: its output, less in-place update-slice buffers."""
  root = comp[0] if comp else None  # computations() puts the ROOT first
  types = {name: t for name, t, *_ in comp}
  ops = {name: (opcode, operands) for name, _, opcode, operands, _ in comp}
  if root is None:
    return type_bytes(out_type)

  def written(value):
    opcode, operands = ops.get(value, (None, []))
    if opcode == 'dynamic-update-slice':
      return type_bytes(types[operands[1]])
    if opcode == 'tuple':
      return sum(written(v) for v in operands)
    if opcode == 'bitcast':
      return written(operands[0])
    return type_bytes(types.get(value, ''))

  return written(root[0])


def hlo_traffic(text: str, top: int = 12) -> dict:
  """The bytes each kernel of an optimized HLO module reads and writes.

  A static count from the module's text (``compiled.as_text()``): for every
  instruction of the entry computation that runs as a kernel (a fusion, a
  custom call, a copy, a reduction, ...), its operands' bytes read and its
  output's bytes written, where a fusion's parameter used only through slices
  counts the slices and an in-place dynamic-update-slice counts the update.
  Instructions of a while loop's body are counted once, not per trip; those
  of a conditional's branches are counted for every branch and also totalled
  apart (``branch_bytes``), since a step runs one branch of each: without
  conditionals ``bytes`` is the step's count, with them it lies between
  ``bytes - branch_bytes`` and ``bytes``.

  Args:
    text: the HLO module after optimizations.
    top: how many kernels to list.

  Returns:
    ``{'bytes': total, 'branch_bytes': of kernels inside conditionals,
    'kernels': count, 'loops': while loops seen, 'conditionals': count,
    'top': [{'name', 'op', 'source', 'read', 'written', 'in_branch'}, ...]}``
    (largest first; ``source`` is the instruction's jax op name).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> text = jax.jit(lambda x: x * 2.0).lower(
    ...     jnp.ones((256, 256))).compile().as_text()
    >>> hlo_traffic(text)['bytes']  # read and write 256 x 256 float32
    524288
  """
  comps, entry = computations(text)
  types = {name: t for comp in comps.values() for name, t, *_ in comp}
  kernels, counts = [], {'while': 0, 'conditional': 0}

  def visit(comp_name, in_branch):
    for name, type_str, opcode, operands, attrs in comps.get(comp_name, []):
      if opcode in _FREE:
        continue
      called = re.findall(r'(?:calls|body|to_apply|branch_computations)='
                          r'\{?%?([\w.\-]+)', attrs)
      if opcode in ('while', 'call', 'conditional'):
        counts[opcode] = counts.get(opcode, 0) + 1
        branches = re.findall(r'(?:true_computation|false_computation)='
                              r'%?([\w.\-]+)', attrs)
        if 'branch_computations=' in attrs:
          branches += re.findall(r'%?([\w.\-]+)', attrs.split(
              'branch_computations={')[1].split('}')[0])
        for c in re.findall(r'(?:body|to_apply)=%?([\w.\-]+)', attrs):
          visit(c, in_branch)
        for c in branches:
          visit(c, True)
        continue
      sizes = [type_bytes(types.get(o, '')) for o in operands]
      if opcode == 'fusion' and called:
        fused = comps.get(called[0], [])
        read = sum(_param_read_bytes(fused, i, s) for i, s in enumerate(sizes))
        written = _fusion_write_bytes(fused, type_str)
      else:
        read, written = sum(sizes), type_bytes(type_str)
      source = re.search(r'op_name="([^"]*)"', attrs)
      kernels.append({'name': name, 'op': opcode,
                      'source': source.group(1) if source else '',
                      'read': read, 'written': written,
                      'in_branch': in_branch})

  visit(entry, False)
  kernels.sort(key=lambda k: -(k['read'] + k['written']))
  moved = lambda ks: sum(k['read'] + k['written'] for k in ks)  # noqa: E731
  return {'bytes': moved(kernels),
          'branch_bytes': moved(k for k in kernels if k['in_branch']),
          'kernels': len(kernels), 'loops': counts['while'],
          'conditionals': counts['conditional'], 'top': kernels[:top]}


def worker(model: str, dtype: str, spec: str, top: int = 8):
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
  text = compiled.as_text()
  entry = text.split('ENTRY', 1)[-1]
  traffic = hlo_traffic(text, top)
  ideal = 3 * param_bytes + 2 * state_bytes
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
      'ideal_bytes': ideal,
      'hlo_bytes': traffic['bytes'],
      'hlo_vs_ideal': traffic['bytes'] / ideal,
      'hlo_kernels': traffic['kernels'],
      'hlo_loops': traffic['loops'],
      'hlo_conditionals': traffic['conditionals'],
      'hlo_branch_bytes': traffic['branch_bytes'],
      'largest_kernels': traffic['top'],
  }), flush=True)


def table(paths) -> str:
  """A Markdown table of result files: the step's bytes in params' bytes.

  ``passes`` = HLO bytes / the params' bytes: how many params-sized arrays
  the step reads and writes (adamw: 7); ``× adamw`` = the HLO bytes over
  adamw's (from the same files); ``p, g, state passes`` = reading p, g and
  the state and writing p and the state once, in the same unit
  (``ideal_bytes``: no pass for statistics). ``branches`` is the number of
  conditionals, whose branches are all counted (records written before it
  was recorded show ``?``).
  """
  rows = []
  for path in paths:
    with open(path) as f:
      rows += [(os.path.basename(path), json.loads(line))
               for line in f if line.strip()]
  base = next((r['hlo_bytes'] for _, r in rows
               if r['optimizer'] == 'adamw' and 'hlo_bytes' in r), None)
  lines = ['| optimizer | file | HLO GB | passes | × adamw | '
           'p, g, state passes | kernels | temp MiB | branches |',
           '|---|---|' + '---:|' * 7]
  for name, r in rows:
    if 'hlo_bytes' not in r:
      error = [l.strip() for l in (r.get('error') or '').splitlines()
               if l.strip() and not l.strip().startswith('@')]
      said = next((l for l in error if re.search(
          r'Out of memory|RESOURCE_EXHAUSTED|Check fail|expects|Error', l)),
                  error[-1] if error else '')
      said = said[:80].replace('|', '/')
      lines.append(f"| {r['optimizer']} | {name} | failed: {said} |"
                   + ' |' * 6)
      continue
    p = r['param_bytes']
    ratio = f"{r['hlo_bytes'] / base:.3f}" if base else ''
    lines.append(
        f"| {r['optimizer']} | {name} | {r['hlo_bytes'] / 1e9:.2f} | "
        f"{r['hlo_bytes'] / p:.2f} | {ratio} | {r['ideal_bytes'] / p:.2f} | "
        f"{r['hlo_kernels']} | {r['temp_bytes'] / 2**20:.1f} | "
        f"{r.get('hlo_conditionals', '?')} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('specs', nargs='*')
  p.add_argument('--model', default='llama1b')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--top', type=int, default=8)
  p.add_argument('--out', default=None, help='JSON lines file (appended)')
  p.add_argument('--dump', default=None, help='folder for the XLA dumps')
  p.add_argument('--keep_dumps', action='store_true')
  p.add_argument('--table', nargs='+', default=None, metavar='JSONL',
                 help='print the Markdown table of these result files')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.table:
    print(table(args.table))
    return 0
  if not args.specs:
    p.error('give at least one optimizer spec (or --table)')
  if args.worker:
    worker(args.model, args.dtype, args.specs[0], args.top)
    return 0
  dump_root = args.dump or tempfile.mkdtemp(prefix='xla_memory_')
  for spec in args.specs:
    folder = os.path.join(dump_root, re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec))
    env = dict(os.environ, XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={folder}'
        ' --xla_dump_hlo_module_re=.*jit_step.*').strip())
    # Nothing of the model is allocated, but jax would reserve 75% of the
    # device up front: several of these side by side then starve each
    # other's autotuning (it ran out of memory on an H200 with six).
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    run = subprocess.run(
        [sys.executable, __file__, '--worker', f'--model={args.model}',
         f'--dtype={args.dtype}', f'--top={args.top}', spec], env=env, capture_output=True,
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
            f'{record["kernels"]} kernels; HLO bytes '
            f'{record["hlo_bytes"] / 1e9:.3f} GB = '
            f'{record["hlo_vs_ideal"]:.2f}x the ideal step',
            file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if not args.keep_dumps:
      shutil.rmtree(folder, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
