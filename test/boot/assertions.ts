// What every boot test asserts about a boot (test/boot/guest-init.sh reports it), and the server
// restart the tests run during the boot.

import assert from 'node:assert/strict';
import { type ServerHandle, killAndRestart } from '../lib/servers.ts';
import { type BootResult, tail } from './lib.ts';

/** While the guest's writer runs: SIGKILL the server, wait, start it again on the same port. */
export function restartOnWriterStart(server: ServerHandle, events: string[]): (line: string) => void {
  return (line) => {
    if (!line.startsWith('writer-start')) return;
    setTimeout(() => killAndRestart(server, events), 2_000);
  };
}

export function assertBooted(r: BootResult, image: { file: string; dataSha256: string }, marker: string, partition?: boolean): void {
  const why = `\n--- console (tail) ---\n${tail(r.console, 80)}`;
  assert.equal(r.timedOut, false, `the VM did not power off in time${why}`);
  assert.ok(r.lines.includes('done'), `init did not finish${why}`);
  assert.match(r.values.get('dev') ?? '', partition ? /^\/dev\/nbd0p1$/ : /^\/dev\/nbd0$/, `root not on NBD${why}`);
  assert.equal(r.values.get('data-sha256'), image.dataSha256, `data read back differs${why}`);
  assert.equal(r.values.get('marker-written'), marker, why);
  // The supervisor: alive after switch_root, argv[0] marked '@', comm unchanged, followed the root.
  const sup = r.lines.find((l) => l.startsWith('supervisor '));
  assert.ok(sup, `no supervisor with an '@' argv[0] after switch_root${why}`);
  assert.match(sup, /argv0=@nbd-attach_\/dev\/nbd0 /, why);
  assert.match(sup, /comm=node /, `comm changed${why}`);
  assert.match(sup, /oom=-1000/, why);
  assert.equal(r.values.get('state-pid'), r.values.get('pid'), `the state in /run names another pid${why}`);
  assert.equal(r.values.get('followed-root'), '1', why);
  // Its log is in /run (tmpfs), not on the root it supervises.
  assert.ok(r.lines.some((l) => l.startsWith('run-file nbd0.log')), `no log in /run/nbd-attach${why}`);
  // The server restart: every round verified, no write failed, no I/O error, one reconnect or more.
  assert.equal(r.values.get('mismatches'), '0', why);
  assert.equal(r.values.get('failed'), '0', why);
  assert.equal(r.values.get('io-errors'), '0', why);
  assert.ok(Number(r.values.get('rounds')) >= 3, why);
  assert.ok(Number(r.values.get('reconnects')) >= 1, `the supervisor did not reconnect${why}`);
}

