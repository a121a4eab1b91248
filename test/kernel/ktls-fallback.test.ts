// Kernel TLS when the session cannot stay in the kernel (run in the VM:
// test/kernel/run.sh test/kernel/ktls-fallback.test.ts):
//  1. tls.ko missing: modprobe refuses the module (an `install tls /bin/false` line in
//     /run/modprobe.d, which the kernel's own request for "tcp-ulp-tls" goes through too); the
//     attach falls back to the relay, says why once, status reports the relay, data flows, and a
//     reconnect stays on the relay without saying it again;
//  2. a real TLS 1.3 KeyUpdate from the server after the handoff (RFC 8446 section 4.6.3): a relay
//     between the client and our `serve --tls` knows the server's traffic secret (node --tls-keylog)
//     and counts its records, then sends a KeyUpdate sealed under the server's key at the next
//     record number and re-seals every later server record under the updated key
//     (application_traffic_secret_1, RFC 8446 section 7.2), as a server that rekeys would. Kernel
//     6.1 cannot take new keys and returns EIO for a record that is not application data when the
//     reader has no control-message buffer (net/tls/tls_sw.c, tls_record_content_type), which the
//     nbd driver does not pass: a dead link, replaced by the supervisor with zero I/O errors.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync, readlinkSync, rmSync, mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanup, loadModule, loadNbd, requireGuest, run, type RunResult, sha256, startNbdkit, tmpDir, tmpFile, waitFor, pidAlive } from './lib.ts';
import { CLI_ARGS, makePki, startServer } from '../lib/servers.ts';
import {
  ContentType,
  type DirectionKeys,
  RecordSplitter,
  type Suite,
  TLS_1_3_VERSION,
  hkdfExpandLabel,
  openRecord,
  parseKeylogLine,
  sealRecord,
  suiteFor,
  tls13Keys,
} from '../../src/client/ktls-keys.ts';
import { assertFioClean, FIO_CAP_S, startFio, writesCompleted } from './fio.ts';
import { attach, cli, detach, listenLoopback, roundTrip, tieEnds, unixSockets } from './ktls-common.ts';

requireGuest();

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const DISK = 64 << 20;

after(cleanup);

const NO_TLS_CONF = '/run/modprobe.d/nbd-attach-test-no-tls.conf';

test('tls.ko missing: the attach falls back to the relay, says why once, status says relay, data flows', { timeout: 600_000 }, async () => {
  await loadNbd();
  // The module must really be absent: unload it (sockets of earlier tests may hold it briefly).
  if (existsSync('/sys/module/tls')) {
    await waitFor(async () => (await run('rmmod', ['tls'])).code === 0 || !existsSync('/sys/module/tls'), 60_000, { what: 'rmmod tls' });
  }
  mkdirSync(path.dirname(NO_TLS_CONF), { recursive: true });
  // modprobe.d(5): "install" replaces the insertion with a command; /bin/false fails it, for
  // `modprobe tls` and for the kernel's request_module("tcp-ulp-tls") alike.
  writeFileSync(NO_TLS_CONF, 'install tls /bin/false\n');
  const pkiDir = makePki(await tmpDir('pki-'), { ec: true });
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pkiDir}`, 'file', disk]);
  try {
    assert.notEqual((await run('modprobe', ['tls'])).code, 0, 'modprobe tls fails while the module is refused');
    const a = await attach(['--connect-timeout', '120', `nbds://127.0.0.1:${server.port}/?tls-certificates=${pkiDir}`], '/dev/nbd1');
    assert.match(a.line, /^\/dev\/nbd1 attached: 64 MiB .* over TLS \(relay: kernel TLS: this kernel has no TLS module \(tls\.ko; CONFIG_TLS\): load it with modprobe tls\)/);
    assert.equal(a.line.match(/no TLS module/g)?.length, 1, `said once by the attach:\n${a.line}`);
    assert.ok(!existsSync('/sys/module/tls'), 'tls.ko was not loaded');
    assert.ok(unixSockets(a.pid) >= 1, 'the relay holds its end of the socketpair');
    const status = await cli(['status', '/dev/nbd1']);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /over TLS \(relay\)/);
    await roundTrip('/dev/nbd1', disk);

    // A new connection (the old one killed) goes straight to the relay, without trying again or saying it again.
    await loadModule('inet_diag');
    await loadModule('tcp_diag');
    const k = await run('ss', ['-K', 'state', 'established', 'dst', `127.0.0.1:${server.port}`]);
    assert.equal(k.code, 0, k.stderr);
    await waitFor(() => /reconnected after/.test(readFileSync(a.log, 'utf8')), 120_000, { what: 'reconnect' }).catch((e: Error) => {
      throw new Error(`${e.message}\n${readFileSync(a.log, 'utf8')}`);
    });
    await roundTrip('/dev/nbd1', disk);
    const log = readFileSync(a.log, 'utf8');
    assert.ok((log.match(/no TLS module/g)?.length ?? 0) <= 1, `the reason is not repeated on reconnect:\n${log}`);
    assert.match((await cli(['status', '/dev/nbd1'])).stdout, /over TLS \(relay\)/);
    await detach('/dev/nbd1', a.pid);
  } finally {
    rmSync(NO_TLS_CONF, { force: true });
    await server.stop();
  }
  assert.equal((await run('modprobe', ['tls'])).code, 0, 'tls.ko loads again once the refusal is gone');
});

/** The TLS 1.3 suite in a plain ServerHello record (RFC 8446 section 4.1.3): header 5, type 1, length 3, version 2, random 32, session id, suite 2. */
function serverHelloSuite(record: Buffer): Suite | undefined {
  if (record.length < 44 || record[0] !== ContentType.HANDSHAKE || record[5] !== 2) return undefined;
  const sid = record[43]!;
  if (record.length < 44 + sid + 2) return undefined;
  const id = record.readUInt16BE(44 + sid);
  const name = { 0x1301: 'TLS_AES_128_GCM_SHA256', 0x1302: 'TLS_AES_256_GCM_SHA384', 0x1303: 'TLS_CHACHA20_POLY1305_SHA256' }[id];
  const s = suiteFor('TLSv1.3', name);
  return typeof s === 'string' ? undefined : s;
}

/** Bytes of each hash's output (HKDF-Expand-Label length of the next traffic secret, RFC 8446 section 7.2). */
const HASH_LENGTH = { sha256: 32, sha384: 48 } as const;

/** KeyUpdate handshake message (RFC 8446 sections 4 and 4.6.3): type key_update (24), length 1, request_update = update_requested (1). */
const KEY_UPDATE = Buffer.from([24, 0, 0, 1, 1]);

interface KeyUpdateRelay {
  port: number;
  /** Send a KeyUpdate before the server's next record (once, on whichever connection carries it). */
  inject(): void;
  injected(): number;
  /** Server records opened under the server's key at their record number (the count checked on the wire). */
  checked(): number;
  /** Records re-sealed under the updated key after the KeyUpdate. */
  resealed(): number;
  problems: string[];
  close(): void;
}

/**
 * A TCP relay client ↔ our server that follows the server's TLS 1.3 records under its
 * application_traffic_secret_0 (from the server's key log, found by the ClientHello's random) and,
 * on inject(), rekeys the server→client direction as RFC 8446 section 4.6.3 says a sender does.
 */
async function keyUpdateRelay(to: number, keylogFile: string): Promise<KeyUpdateRelay> {
  let pending = false;
  let injected = 0;
  let checked = 0;
  let resealed = 0;
  const problems: string[] = [];
  const socks = new Set<net.Socket>();
  const srv = net.createServer((c) => {
    const s = net.connect(to, '127.0.0.1');
    socks.add(c).add(s);
    let clientRandom: Buffer | undefined;
    let suite: Suite | undefined;
    let secret: Buffer | undefined;
    let keys: DirectionKeys | undefined;
    /** Next server record number under `keys`; undefined until the first application record is found. */
    let seq: bigint | undefined;
    /** Encrypted server records kept until the key log has the secret (a handshake's worth, bounded). */
    let backlog: Buffer[] = [];
    let updated: { keys: DirectionKeys; seq: bigint } | undefined;
    let tls = false;
    const split = new RecordSplitter();
    const fail = (why: string): void => {
      problems.push(why);
      c.destroy();
      s.destroy();
    };
    const loadKeys = (): void => {
      if (keys || !suite || !clientRandom || !existsSync(keylogFile)) return;
      for (const line of readFileSync(keylogFile, 'latin1').split('\n')) {
        const p = parseKeylogLine(Buffer.from(line, 'latin1'));
        if (p?.label === 'SERVER_TRAFFIC_SECRET_0' && p.clientRandom.equals(clientRandom)) {
          secret = p.secret;
          keys = tls13Keys(suite, secret);
        }
      }
    };
    /** Count one encrypted server record: it must open at its number (from the first that opens as record 0). */
    const count = (bytes: Buffer): boolean => {
      if (seq === undefined) {
        if (openRecord(suite!, keys!, 0n, bytes)) seq = 1n;
        return true; // a handshake record (handshake keys): not counted
      }
      if (!openRecord(suite!, keys!, seq, bytes)) {
        fail(`server record ${seq} does not open under application_traffic_secret_0`);
        return false;
      }
      seq++;
      checked++;
      return true;
    };
    c.on('data', (b: Buffer) => {
      // The ClientHello comes alone after the STARTTLS reply: handshake record, type client_hello (1);
      // its random follows the record header, the handshake header and legacy_version (RFC 8446 section 4.1.2).
      if (!clientRandom && b.length >= 43 && b[0] === ContentType.HANDSHAKE && b[1] === 3 && b[5] === 1) clientRandom = Buffer.from(b.subarray(11, 43));
      s.write(b);
    });
    s.on('data', (b: Buffer) => {
      if (!tls && b[0] === ContentType.HANDSHAKE && b[1] === 3) tls = true;
      if (!tls) {
        c.write(b);
        return;
      }
      let recs;
      try {
        recs = split.push(b);
      } catch (e) {
        fail((e as Error).message);
        return;
      }
      for (const r of recs) {
        const bytes = Buffer.from(r.bytes);
        if (!suite) {
          suite = serverHelloSuite(bytes);
          if (!suite || suite.version !== TLS_1_3_VERSION) return fail('the server did not choose a TLS 1.3 AEAD suite');
          c.write(bytes);
          continue;
        }
        if (r.type !== ContentType.APPLICATION_DATA) {
          c.write(bytes); // TLS 1.3 middlebox-compatibility ChangeCipherSpec
          continue;
        }
        if (!keys) {
          loadKeys();
          if (!keys) {
            backlog.push(bytes);
            if (backlog.length > 64) return fail('no SERVER_TRAFFIC_SECRET_0 in the key log after 64 records');
            c.write(bytes);
            continue;
          }
          for (const old of backlog) if (!count(old)) return;
          backlog = [];
        }
        if (pending && seq !== undefined && !updated && checked > 0) {
          pending = false;
          injected++;
          // The KeyUpdate is sealed under the current key at the next number; everything after it
          // under application_traffic_secret_1 = HKDF-Expand-Label(secret_0, "traffic upd", "", Hash.length).
          // (`seq` stays the server's own count: its record `seq` is re-sealed below as record 0 under the new key.)
          c.write(sealRecord(suite, keys!, seq, ContentType.HANDSHAKE, KEY_UPDATE));
          const next = hkdfExpandLabel(suite.hash, secret!, 'traffic upd', Buffer.alloc(0), HASH_LENGTH[suite.hash]);
          updated = { keys: tls13Keys(suite, next), seq: 0n };
        }
        if (updated) {
          const open = openRecord(suite, keys!, seq!, bytes);
          if (!open) return fail(`server record ${seq} does not open under application_traffic_secret_0`);
          seq!++;
          checked++;
          c.write(sealRecord(suite, updated.keys, updated.seq++, open.type, open.plaintext));
          resealed++;
          continue;
        }
        if (!count(bytes)) return;
        c.write(bytes);
      }
    });
    tieEnds(c, s);
  });
  return {
    port: await listenLoopback(srv),
    inject: () => (pending = true),
    injected: () => injected,
    checked: () => checked,
    resealed: () => resealed,
    problems,
    close: () => {
      srv.close();
      for (const x of socks) x.destroy();
    },
  };
}

test('a real TLS 1.3 KeyUpdate from the server after the handoff: dead link, reconnected with kernel TLS, fio verify clean', { timeout: 600_000 }, async () => {
  await loadNbd();
  const pkiDir = makePki(await tmpDir('pki-'), { ec: true });
  const disk = await tmpFile(DISK);
  const keylog = path.join(await tmpDir('keylog-'), 'server.keys');
  // node --tls-keylog: the server process appends every TLS secret in NSS key log format.
  const server = await startServer({
    name: 'nbd-attach serve (key log)',
    file: process.execPath,
    args: (port) => [`--tls-keylog=${keylog}`, ...CLI_ARGS, 'serve', '--port', String(port), `kdisk=${disk}`, '--tls', 'require', '--tls-certificates', pkiDir],
    startTimeoutMs: 120_000,
  });
  const relay = await keyUpdateRelay(server.port, keylog);
  try {
    // A generous handshake deadline: a TLS handshake with Node on both ends is slow under emulation.
    const a = await attach(['--connect-timeout', '120', `nbds://127.0.0.1:${relay.port}/kdisk?tls-certificates=${pkiDir}`], '/dev/nbd2');
    assert.match(a.line, /over TLS \(kernel TLS\)/);
    const fio = startFio('/dev/nbd2', FIO_CAP_S, 'ktls', 8);
    const w0 = writesCompleted(2);
    await waitFor(() => writesCompleted(2) > w0 + 20 && relay.checked() > 20, 120_000, { what: 'fio writing, server records counted' });
    relay.inject();
    await waitFor(() => relay.injected() === 1 && /reconnected after/.test(readFileSync(a.log, 'utf8')), 120_000, { what: 'reconnect after the KeyUpdate' }).catch((e: Error) => {
      throw new Error(`${e.message}\nrelay: ${relay.problems.join('; ')}\n${readFileSync(a.log, 'utf8')}`);
    });
    assertFioClean(await fio.stopAfterWrites(2, 100), 'KeyUpdate after the handoff');
    assert.deepEqual(relay.problems, [], 'every server record opened at its number under the traffic secret the relay followed');
    assert.ok(relay.checked() > 20, `the relay followed the server's record numbers (${relay.checked()} records)`);
    console.log(`# KeyUpdate: ${relay.checked()} server records checked, ${relay.resealed()} re-sealed under the updated key before the link was dropped`);
    assert.equal(unixSockets(a.pid), 0, 'the replacement connection is kernel TLS again');
    await roundTrip('/dev/nbd2', disk); // and data goes both ways over it
    const log = readFileSync(a.log, 'utf8');
    assert.doesNotMatch(log, /relay:/, 'no fallback to the relay for a dead link');
    await detach('/dev/nbd2', a.pid);
  } finally {
    relay.close();
    await server.stop();
  }
});
