// packaging/systemd/nbd-attach@.service (and its root-or-swap.conf drop-in) through systemd's own
// `systemd-analyze verify`, instantiated as nbd-attach@nbd0.service from a copy in a temporary
// directory whose binary path points at an executable stand-in (verify refuses a unit whose
// ExecStart= is missing). verify exits 0 for lines it ignores (unknown keys, bad values) and for
// ordering cycles it breaks, and only reports them on stderr: so a unit passes when the exit code
// is 0 and stderr says nothing about it. The same check must reject each planted problem.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { tmpDir } from '../lib/servers.ts';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const UNIT = readFileSync(path.join(REPO, 'packaging/systemd/nbd-attach@.service'), 'utf8');
const DROP_IN = readFileSync(path.join(REPO, 'packaging/systemd/root-or-swap.conf'), 'utf8');
const ANALYZE = '/usr/bin/systemd-analyze';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** Lay the unit (and an optional drop-in for nbd0) out in a fresh directory and verify nbd-attach@nbd0.service. */
function verify(unit: string, dropIn?: string, binary: 'present' | 'absent' = 'present'): { ok: boolean; report: string } {
  const dir = tmpDir('nbd-attach-unit-');
  dirs.push(dir);
  const bin = path.join(dir, 'bin', 'nbd-attach');
  if (binary === 'present') {
    mkdirSync(path.dirname(bin));
    writeFileSync(bin, '#!/bin/sh\nexit 0\n');
    chmodSync(bin, 0o755);
  }
  writeFileSync(path.join(dir, 'nbd-attach@.service'), unit.replaceAll('/usr/sbin/nbd-attach', bin));
  if (dropIn !== undefined) {
    mkdirSync(path.join(dir, 'nbd-attach@nbd0.service.d'));
    writeFileSync(path.join(dir, 'nbd-attach@nbd0.service.d', 'root-or-swap.conf'), dropIn);
  }
  const r = spawnSync(ANALYZE, ['verify', '--man=no', path.join(dir, 'nbd-attach@nbd0.service')], { encoding: 'utf8', timeout: 60_000 });
  const ours = r.stderr.split('\n').filter((l) => l.includes('nbd-attach@'));
  return { ok: r.status === 0 && ours.length === 0, report: `exit ${r.status}\n${r.stderr}` };
}

const haveAnalyze = existsSync(ANALYZE);

test('nbd-attach@nbd0.service passes systemd-analyze verify', { skip: !haveAnalyze && 'systemd-analyze is not installed' }, () => {
  const r = verify(UNIT);
  assert.ok(r.ok, r.report);
});

test('with the root-or-swap drop-in it still passes (no ordering cycle without default dependencies)', { skip: !haveAnalyze && 'systemd-analyze is not installed' }, () => {
  const r = verify(UNIT, DROP_IN);
  assert.ok(r.ok, r.report);
});

test('the unit says what a notify service needs: notify, foreground nbdtab form, detach on stop, ordering', () => {
  const lines = UNIT.split('\n').filter((l) => !l.startsWith('#'));
  const has = (l: string): void => assert.ok(lines.includes(l), `missing '${l}'`);
  has('Type=notify');
  has('NotifyAccess=main');
  has('ExecStart=/usr/sbin/nbd-attach -n $NBD_ATTACH_OPTIONS %I');
  has('ExecStop=/usr/sbin/nbd-attach -d /dev/%I');
  has('After=network-online.target modprobe@nbd.service');
  has('Wants=network-online.target modprobe@nbd.service');
  has('Before=remote-fs-pre.target dev-%i.swap');
  has('Restart=on-failure');
  assert.match(DROP_IN, /^Environment=NBD_ATTACH_OPTIONS=--systemd-mark$/m);
  assert.match(DROP_IN, /^ExecStop=$/m);
  assert.match(DROP_IN, /^DefaultDependencies=no$/m);
});

test('the check rejects real problems: bad value, unknown key, ordering cycle, missing binary', { skip: !haveAnalyze && 'systemd-analyze is not installed' }, () => {
  const plant = (text: string, re: RegExp, by: string): string => {
    const out = text.replace(re, by);
    assert.notEqual(out, text, `${re} planted nothing`);
    return out;
  };
  const planted: [string, { ok: boolean; report: string }][] = [
    ['Type=notfy', verify(plant(UNIT, /^Type=notify$/m, 'Type=notfy'))],
    ['NotifyAcess=', verify(plant(UNIT, /^NotifyAccess=main$/m, 'NotifyAcess=main'))],
    ['cycle with network-online.target', verify(plant(UNIT, /^Before=remote-fs-pre.target/m, 'Before=remote-fs-pre.target network-online.target'))],
    ['missing ExecStart binary', verify(UNIT, undefined, 'absent')],
    ['typo in the drop-in', verify(UNIT, plant(DROP_IN, /^ExecStop=$/m, 'ExecStop=\nExecStp=x'))],
  ];
  for (const [what, r] of planted) assert.equal(r.ok, false, `${what} passed:\n${r.report}`);
});
