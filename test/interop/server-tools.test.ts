// `nbd-attach serve` against real NBD clients from Debian (qemu-utils, libnbd-bin): qemu-img,
// qemu-io, nbdinfo, nbdcopy, all over loopback with a free port.

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { CLI_ARGS, makePki, sparseFile } from '../lib/servers.ts';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

const STEP_TIMEOUT = 30_000;

const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-serve-tools-'));
const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

interface Served {
  child: ChildProcess;
  port: number;
  line: string;
  output: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start `nbd-attach serve ARGS --port 0` and wait (bounded) for its "listening on" line. */
async function serve(args: string[]): Promise<Served> {
  const child = spawn(process.execPath, [...CLI_ARGS, 'serve', ...args, '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const line = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not start within 20 s:\n${out}`)), 20_000);
    const onData = (d: Buffer): void => {
      out += d;
      const m = /^nbd-attach serve: listening on .*$/m.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[0]);
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (d: Buffer) => (out += d));
    void exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`serve exited (${code}) before listening:\n${out}`));
    });
  });
  const port = Number(/127\.0\.0\.1:(\d+)/.exec(line)?.[1]);
  assert.ok(port > 0, line);
  return { child, port, line, output: () => out, exited };
}

async function stop(s: Served): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  s.child.kill('SIGTERM');
  const timer = setTimeout(() => s.child.kill('SIGKILL'), 10_000);
  const r = await s.exited;
  clearTimeout(timer);
  return r;
}

function run(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: STEP_TIMEOUT });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function ok(cmd: string, args: string[]): string {
  const r = run(cmd, args);
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('nbd-attach serve with real clients', { timeout: 180_000 }, () => {
  const disk = path.join(dir, 'disk.img');
  const other = path.join(dir, 'other.img');
  let srv: Served;
  let base: string;

  before(async () => {
    writeFileSync(disk, Buffer.alloc(0));
    truncateSync(disk, 16 << 20);
    writeFileSync(other, Buffer.alloc(0));
    truncateSync(other, 8 << 20);
    srv = await serve([disk, `second=${other}`, '--memory', '32M', '--name', 'first', '--name', 'mem']);
    base = `nbd://127.0.0.1:${srv.port}`;
  });
  after(async () => {
    if (srv) await stop(srv);
  });

  it('prints one line with the address and the exports', () => {
    assert.match(srv.line, /^nbd-attach serve: listening on 127\.0\.0\.1:\d+; exports: first \(file .*disk\.img, 16 MiB\), second \(file .*other\.img, 8 MiB\), mem \(memory 32 MiB\)$/);
  });

  it('qemu-img info sees the size', () => {
    const out = ok('qemu-img', ['info', '--output=json', `${base}/first`]);
    assert.equal(JSON.parse(out)['virtual-size'], 16 << 20);
  });

  it('qemu-io writes and reads back a pattern; the file holds it', () => {
    const out = ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'read -P 0xab 0 1M', '-c', 'write -z 1M 64k', '-c', 'read -P 0 1M 64k', `${base}/first`]);
    assert.match(out, /wrote 1048576\/1048576 bytes at offset 0/);
    assert.match(out, /read 1048576\/1048576 bytes at offset 0/);
    assert.doesNotMatch(out, /Pattern verification failed/);
    const onDisk = readFileSync(disk);
    assert.deepEqual(onDisk.subarray(0, 1 << 20), Buffer.alloc(1 << 20, 0xab));
  });

  it('qemu-io discard, flush and FUA writes succeed', () => {
    const out = ok('qemu-io', ['-f', 'raw', '-c', 'write -f -P 0x11 2M 64k', '-c', 'flush', '-c', 'discard 4M 1M', '-c', 'read -P 0x11 2M 64k', `${base}/first`]);
    assert.doesNotMatch(out, /fail|error/i);
  });

  it('nbdinfo --list shows every export', () => {
    const out = JSON.parse(ok('nbdinfo', ['--list', '--json', base])) as { exports: { 'export-name': string; 'export-size': number }[] };
    assert.deepEqual(
      out.exports.map((e) => [e['export-name'], e['export-size']]),
      [['first', 16 << 20], ['second', 8 << 20], ['mem', 32 << 20]],
    );
  });

  it('nbdinfo: flags and block sizes of one export', () => {
    const out = JSON.parse(ok('nbdinfo', ['--json', `${base}/mem`])) as { exports: Record<string, unknown>[]; protocol: string };
    const e = out.exports[0]!;
    assert.equal(out.protocol, 'newstyle-fixed');
    assert.equal(e['export-size'], 32 << 20);
    assert.equal(e['is_read_only'], false);
    assert.equal(e['can_flush'], true);
    assert.equal(e['can_fua'], true);
    assert.equal(e['can_trim'], true);
    assert.equal(e['can_zero'], true);
    assert.equal(e['can_multi_conn'], true);
    assert.equal(e['block_size_maximum'], 1 << 25);
    assert.equal(e['description'], 'memory 32 MiB');
  });

  it('an unknown export is refused with NBD_REP_ERR_UNKNOWN', () => {
    const r = run('nbdinfo', [`${base}/nope`]);
    assert.notEqual(r.status, 0);
    // libnbd maps NBD_REP_ERR_UNKNOWN to ENOENT ("No such file or directory")
    assert.match(r.stderr, /No such file or directory for export: nope/);
  });

  it('nbdcopy into the server and back out, checksums equal (memory and file exports)', () => {
    const src = path.join(dir, 'src.bin');
    const data = randomBytes(8 << 20);
    writeFileSync(src, data);
    for (const name of ['mem', 'second']) {
      const back = path.join(dir, `back-${name}.bin`);
      ok('nbdcopy', ['--connections=4', '--requests=32', src, `${base}/${name}`]);
      ok('nbdcopy', ['--connections=4', '--requests=32', `${base}/${name}`, back]);
      const got = readFileSync(back).subarray(0, data.length);
      assert.equal(sha(got), sha(data), name);
    }
    assert.equal(sha(readFileSync(other)), sha(data)); // second is exactly 8 MiB: the file is the copy
  });

  it('an image on tmpfs (WRITEs received straight into its pages): nbdcopy over 4 connections, twice, checksums equal', async () => {
    const shm = mkdtempSync('/dev/shm/nbd-serve-tools-');
    const img = sparseFile(shm, 'ram.img', 8 << 20);
    const s = await serve([img]);
    try {
      // The first copy fills holes (the ordinary write path), the second lands in allocated pages.
      for (const round of [1, 2]) {
        const src = path.join(dir, `shm-src-${round}.bin`);
        const data = randomBytes(8 << 20);
        writeFileSync(src, data);
        ok('nbdcopy', ['--connections=4', '--requests=32', src, `nbd://127.0.0.1:${s.port}/`]);
        const back = path.join(dir, `shm-back-${round}.bin`);
        ok('nbdcopy', [`nbd://127.0.0.1:${s.port}/`, back]);
        assert.equal(sha(readFileSync(back)), sha(data), `round ${round}: read back`);
        assert.equal(sha(readFileSync(img)), sha(data), `round ${round}: the file holds it`);
      }
      assert.deepEqual(await stop(s), { code: 0, signal: null });
    } finally {
      if (s.child.exitCode === null) await stop(s);
      rmSync(shm, { recursive: true, force: true });
    }
  });

  it('nbdcopy of a sparse source: zeros really read back as zeros', () => {
    const src = path.join(dir, 'sparse.bin');
    writeFileSync(src, Buffer.alloc(0));
    truncateSync(src, 8 << 20);
    ok('nbdcopy', [src, `${base}/second`]); // overwrites the random data with (zero) holes
    const back = path.join(dir, 'sparse-back.bin');
    ok('nbdcopy', [`${base}/second`, back]);
    assert.deepEqual(readFileSync(back), Buffer.alloc(8 << 20));
  });
});

describe('nbd-attach serve: defaults, read-only, shutdown, usage', { timeout: 120_000 }, () => {
  it('one export: reachable by the empty (default) name', async () => {
    const f = path.join(dir, 'only.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x42));
    const s = await serve([f]);
    try {
      const out = JSON.parse(ok('nbdinfo', ['--json', `nbd://127.0.0.1:${s.port}`])) as { exports: Record<string, unknown>[] };
      assert.equal(out.exports[0]!['export-size'], 1 << 20);
      ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x42 0 1M', `nbd://127.0.0.1:${s.port}`]);
    } finally {
      assert.equal((await stop(s)).code, 0);
    }
  });

  it('--read-only: advertised, and clients refuse to write', async () => {
    const f = path.join(dir, 'ro.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 7));
    const s = await serve([f, '--read-only']);
    try {
      assert.match(s.line, /read-only\)$/);
      const out = JSON.parse(ok('nbdinfo', ['--json', `nbd://127.0.0.1:${s.port}/ro.img`])) as { exports: Record<string, unknown>[] };
      assert.equal(out.exports[0]!['is_read_only'], true);
      assert.equal(out.exports[0]!['can_trim'], false);
      const src = path.join(dir, 'x.bin');
      writeFileSync(src, Buffer.alloc(1 << 20, 1));
      const r = run('nbdcopy', [src, `nbd://127.0.0.1:${s.port}/ro.img`]);
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, /read-only/);
      assert.deepEqual(readFileSync(f), Buffer.alloc(1 << 20, 7));
    } finally {
      await stop(s);
    }
  });

  it('SIGTERM: exits 0 after serving, data flushed to the file', async () => {
    const f = path.join(dir, 'term.img');
    writeFileSync(f, Buffer.alloc(2 << 20));
    const s = await serve([f]);
    ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5e 0 2M', `nbd://127.0.0.1:${s.port}/term.img`]);
    const r = await stop(s);
    assert.deepEqual(r, { code: 0, signal: null });
    assert.deepEqual(readFileSync(f), Buffer.alloc(2 << 20, 0x5e));
  });

  it('usage errors exit 2 with one line', () => {
    const tls = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls', 'require']);
    assert.equal(tls.status, 2);
    assert.match(tls.stderr, /^nbd-attach: serve --tls require: give --tls-certificates DIR/);
    const certs = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls', 'on', '--tls-certificates', path.join(dir, 'no-pki')]);
    assert.equal(certs.status, 2);
    assert.match(certs.stderr, /^nbd-attach: serve --tls-certificates: cannot read .*server-cert\.pem: ENOENT/);
    const verifyAlone = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls-verify-peer']);
    assert.equal(verifyAlone.status, 2);
    assert.match(verifyAlone.stderr, /^nbd-attach: serve --tls-verify-peer: also give --tls on or --tls require/);
    const noCa = path.join(dir, 'no-ca');
    mkdirSync(noCa);
    const verifyNoCa = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls', 'on', '--tls-certificates', noCa, '--tls-verify-peer']);
    assert.equal(verifyNoCa.status, 2);
    assert.match(verifyNoCa.stderr, /^nbd-attach: serve --tls-verify-peer: .*ca-cert\.pem is missing/);
    const both = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls', 'on', '--tls-certificates', noCa, '--tls-psk', path.join(noCa, 'keys.psk')]);
    assert.equal(both.status, 2);
    assert.match(both.stderr, /^nbd-attach: serve: give either --tls-certificates or --tls-psk, not both/);
    const badPsk = path.join(dir, 'bad.psk');
    writeFileSync(badPsk, 'alice:c0ffee\nbob=123\n');
    const pskLine = run(process.execPath, [...CLI_ARGS, 'serve', '--memory', '1M', '--tls', 'on', '--tls-psk', badPsk]);
    assert.equal(pskLine.status, 2);
    assert.match(pskLine.stderr, /^nbd-attach: serve --tls-psk: .*bad\.psk line 2 is not IDENTITY:HEXKEY/);
    const missing = run(process.execPath, [...CLI_ARGS, 'serve', path.join(dir, 'missing.img')]);
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /no such file/);
    const none = run(process.execPath, [...CLI_ARGS, 'serve']);
    assert.equal(none.status, 2);
    assert.match(none.stderr, /nothing to serve/);
  });
});

describe('nbd-attach serve with TLS (NBD_OPT_STARTTLS) and real clients', { timeout: 120_000 }, () => {
  let pki = '';
  before(() => {
    pki = makePki(dir);
  });

  it('--tls require: libnbd (nbdinfo, nbdcopy) and qemu over TLS read and write; plain clients are refused', async () => {
    const f = path.join(dir, 'tls.img');
    writeFileSync(f, Buffer.alloc(4 << 20));
    const s = await serve(['--tls', 'require', '--tls-certificates', pki, f]);
    try {
      assert.match(s.line, /TLS required/);
      const uri = `nbds://127.0.0.1:${s.port}/tls.img?tls-certificates=${pki}`;
      const info = JSON.parse(ok('nbdinfo', ['--json', uri])) as { exports: Record<string, unknown>[] };
      assert.equal(info.exports[0]!['export-size'], 4 << 20);
      const data = randomBytes(1 << 20);
      const src = path.join(dir, 'tls-src.bin');
      writeFileSync(src, data);
      ok('nbdcopy', [src, uri]);
      assert.ok(readFileSync(f).subarray(0, 1 << 20).equals(data), 'the file holds what nbdcopy sent over TLS');
      const back = path.join(dir, 'tls-back.bin');
      ok('nbdcopy', [uri, back]);
      assert.ok(readFileSync(back).subarray(0, 1 << 20).equals(data), 'and reads it back over TLS');
      // qemu's client: TLS credentials object pointing at the same CA.
      const qemu = ok('qemu-io', [
        '--object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=client`,
        '--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},export=tls.img,tls-creds=tls0`,
        '-c', 'write -P 0x3c 2M 64k', '-c', 'read -P 0x3c 2M 64k',
      ]);
      assert.match(qemu, /wrote 65536\/65536/);
      assert.deepEqual(readFileSync(f).subarray(2 << 20, (2 << 20) + 65536), Buffer.alloc(65536, 0x3c));
      // Without TLS: every option is answered TLS_REQD, so the client gives up.
      const plain = spawnSync('nbdinfo', [`nbd://127.0.0.1:${s.port}/tls.img`], { encoding: 'utf8', timeout: STEP_TIMEOUT, env: { ...process.env, LIBNBD_DEBUG: '1' } });
      assert.notEqual(plain.status, 0);
      assert.match(plain.stderr, /server error message: this server requires TLS: send NBD_OPT_STARTTLS first/);
    } finally {
      assert.deepEqual(await stop(s), { code: 0, signal: null });
    }
  });

  it('--tls on: TLS is offered, and clients without it still work', async () => {
    const s = await serve(['--tls', 'on', '--tls-certificates', pki, '--memory', '1M']);
    try {
      assert.match(s.line, /TLS offered/);
      const plain = JSON.parse(ok('nbdinfo', ['--json', `nbd://127.0.0.1:${s.port}/memory`])) as { exports: Record<string, unknown>[] };
      assert.equal(plain.exports[0]!['export-size'], 1 << 20);
      const secure = JSON.parse(ok('nbdinfo', ['--json', `nbds://127.0.0.1:${s.port}/memory?tls-certificates=${pki}`])) as { exports: Record<string, unknown>[] };
      assert.equal(secure.exports[0]!['export-size'], 1 << 20);
    } finally {
      await stop(s);
    }
  });

  it('--tls-verify-peer: only clients with a certificate signed by the CA get in', async () => {
    const s = await serve(['--tls', 'require', '--tls-certificates', pki, '--tls-verify-peer', '--memory', '1M']);
    try {
      assert.match(s.line, /TLS required, client certificates verified/);
      // libnbd and qemu present client-cert.pem/client-key.pem from the directory.
      const uri = (certs: string): string => `nbds://127.0.0.1:${s.port}/memory?tls-certificates=${certs}`;
      const good = JSON.parse(ok('nbdinfo', ['--json', uri(pki)])) as { exports: Record<string, unknown>[] };
      assert.equal(good.exports[0]!['export-size'], 1 << 20);
      const qemu = ok('qemu-io', [
        '--object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=client`,
        '--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},export=memory,tls-creds=tls0`,
        '-c', 'write -P 0x5a 0 4k', '-c', 'read -P 0x5a 0 4k',
      ]);
      assert.match(qemu, /read 4096\/4096/);
      // The CA alone, no client certificate: refused.
      const caOnly = path.join(dir, 'ca-only');
      mkdirSync(caOnly);
      writeFileSync(path.join(caOnly, 'ca-cert.pem'), readFileSync(path.join(pki, 'ca-cert.pem')));
      assert.notEqual(run('nbdinfo', [uri(caOnly)]).status, 0);
      // A client certificate from another CA: refused.
      const other = path.join(dir, 'other-client');
      mkdirSync(other);
      const otherPki = makePki(other);
      const foreign = path.join(dir, 'foreign-client');
      mkdirSync(foreign);
      writeFileSync(path.join(foreign, 'ca-cert.pem'), readFileSync(path.join(pki, 'ca-cert.pem')));
      for (const f of ['client-cert.pem', 'client-key.pem']) writeFileSync(path.join(foreign, f), readFileSync(path.join(otherPki, f)));
      assert.notEqual(run('nbdinfo', [uri(foreign)]).status, 0);
      // And the server still serves the right client.
      assert.equal((JSON.parse(ok('nbdinfo', ['--json', uri(pki)])) as { exports: Record<string, unknown>[] }).exports[0]!['export-size'], 1 << 20);
    } finally {
      assert.deepEqual(await stop(s), { code: 0, signal: null });
    }
  });

  it('--tls-psk: clients with the right pre-shared key get in (libnbd, qemu); a wrong key or identity does not', async () => {
    const keyDir = path.join(dir, 'psk');
    mkdirSync(keyDir);
    const keys = path.join(keyDir, 'keys.psk'); // qemu's tls-creds-psk reads DIR/keys.psk
    const alice = randomBytes(32).toString('hex');
    writeFileSync(keys, `alice:${alice}\n`);
    const s = await serve(['--tls', 'require', '--tls-psk', keys, '--memory', '1M']);
    try {
      assert.match(s.line, /TLS required, pre-shared keys \(1\)/);
      const uri = (user: string, file: string): string => `nbds://${user}@127.0.0.1:${s.port}/memory?tls-psk-file=${file}`;
      const good = JSON.parse(ok('nbdinfo', ['--json', uri('alice', keys)])) as { exports: Record<string, unknown>[] };
      assert.equal(good.exports[0]!['export-size'], 1 << 20);
      const qemu = ok('qemu-io', [
        '--object', `tls-creds-psk,id=tls0,dir=${keyDir},username=alice,endpoint=client`,
        '--image-opts', `driver=nbd,host=127.0.0.1,port=${s.port},export=memory,tls-creds=tls0`,
        '-c', 'write -P 0x6b 0 4k', '-c', 'read -P 0x6b 0 4k',
      ]);
      assert.match(qemu, /read 4096\/4096/);
      const wrongKey = path.join(dir, 'wrong.psk');
      writeFileSync(wrongKey, `alice:${randomBytes(32).toString('hex')}\n`);
      assert.notEqual(run('nbdinfo', [uri('alice', wrongKey)]).status, 0);
      const stranger = path.join(dir, 'stranger.psk');
      writeFileSync(stranger, `mallory:${alice}\n`);
      assert.notEqual(run('nbdinfo', [uri('mallory', stranger)]).status, 0);
      assert.equal((JSON.parse(ok('nbdinfo', ['--json', uri('alice', keys)])) as { exports: Record<string, unknown>[] }).exports[0]!['export-size'], 1 << 20);
    } finally {
      assert.deepEqual(await stop(s), { code: 0, signal: null });
    }
  });

  it('a client that fails the TLS handshake is cut off; the server keeps serving', async () => {
    const s = await serve(['--tls', 'require', '--tls-certificates', pki, '--memory', '1M']);
    try {
      // nbdinfo with a CA that did not sign the server's certificate: verification fails.
      const other = path.join(dir, 'other');
      mkdirSync(other);
      const otherPki = makePki(other);
      const bad = run('nbdinfo', [`nbds://127.0.0.1:${s.port}/memory?tls-certificates=${otherPki}`]);
      assert.notEqual(bad.status, 0);
      const good = JSON.parse(ok('nbdinfo', ['--json', `nbds://127.0.0.1:${s.port}/memory?tls-certificates=${pki}`])) as { exports: Record<string, unknown>[] };
      assert.equal(good.exports[0]!['export-size'], 1 << 20);
    } finally {
      await stop(s);
    }
  });
});
