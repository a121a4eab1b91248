// Our own client against our own server: negotiate (NBD_OPT_GO and the EXPORT_NAME fallback),
// then simple-reply transmission as the kernel would do it; `nbd-attach list`/`info` output.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { CLI_ARGS, readExact } from '../lib/servers.ts';
import { after, before, describe, it } from 'node:test';
import type { Target } from '../../src/address.ts';
import { negotiate } from '../../src/client/negotiate.ts';
import { Cmd, SIMPLE_REPLY_LENGTH, TransmissionFlag } from '../../src/protocol/constants.ts';
import { decodeSimpleReply, encodeRequest } from '../../src/protocol/codec.ts';
import { memoryExport, startServer, type RunningServer } from '../../src/server/index.ts';


/** Read exactly n bytes from a paused socket (bounded by the test timeout). */
describe('nbd-attach client against nbd-attach serve', { timeout: 60_000 }, () => {
  let srv: RunningServer;
  before(async () => {
    srv = await startServer({
      port: 0,
      exports: [memoryExport(8 << 20, { name: 'alpha', description: 'first disk' }), memoryExport(1 << 20, { name: 'beta', readOnly: true })],
    });
  });
  after(async () => {
    await srv.close();
  });
  const target = (): Target => ({
    endpoint: { kind: 'tcp', host: '127.0.0.1', port: srv.port! },
    tls: false,
  });

  for (const noOptGo of [false, true]) {
    it(`negotiates with ${noOptGo ? 'NBD_OPT_EXPORT_NAME' : 'NBD_OPT_GO'}, then writes and reads with simple replies`, async () => {
      const conn = await negotiate(target(), { exportName: 'alpha', noOptGo, timeoutMs: 5000 });
      try {
        assert.equal(conn.info.size, 8n << 20n);
        assert.equal(conn.via, noOptGo ? 'NBD_OPT_EXPORT_NAME' : 'NBD_OPT_GO');
        assert.ok(conn.info.flags & TransmissionFlag.SEND_FLUSH);
        assert.ok(conn.info.flags & TransmissionFlag.CAN_MULTI_CONN);
        assert.equal(conn.info.flags & TransmissionFlag.SEND_DF, 0, 'no structured replies negotiated');
        if (!noOptGo) assert.deepEqual(conn.info.blockSize, { min: 1, preferred: 4096, max: 1 << 25 });
        const s = conn.socket;
        const data = Buffer.alloc(65536);
        for (let i = 0; i < data.length; i++) data[i] = i % 251;
        // Pipeline like the kernel: write, flush and read sent back to back.
        s.write(Buffer.concat([
          encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 4096n, length: data.length }),
          data,
          encodeRequest({ type: Cmd.FLUSH, flags: 0, cookie: 2n, offset: 0n, length: 0 }),
        ]));
        const replies = [decodeSimpleReply(await readExact(s, SIMPLE_REPLY_LENGTH)), decodeSimpleReply(await readExact(s, SIMPLE_REPLY_LENGTH))];
        assert.deepEqual(replies.map((r) => r.error), [0, 0]);
        assert.deepEqual(new Set(replies.map((r) => r.cookie)), new Set([1n, 2n]));
        s.write(encodeRequest({ type: Cmd.READ, flags: 0, cookie: 3n, offset: 4096n, length: data.length }));
        const r = decodeSimpleReply(await readExact(s, SIMPLE_REPLY_LENGTH));
        assert.deepEqual(r, { error: 0, cookie: 3n });
        assert.deepEqual(await readExact(s, data.length), data);
        s.write(encodeRequest({ type: Cmd.DISC, flags: 0, cookie: 4n, offset: 0n, length: 0 }));
        await new Promise<void>((resolve) => {
          s.once('close', () => resolve());
          s.resume();
        });
      } finally {
        conn.socket.destroy();
      }
    });
  }

  it('an unknown export fails with NBD_E_EXPORT_UNKNOWN', async () => {
    await assert.rejects(negotiate(target(), { exportName: 'gamma', timeoutMs: 5000 }), (e: unknown) => (e as { code?: string }).code === 'NBD_E_EXPORT_UNKNOWN');
  });

  // The server runs in this process: the CLI must run asynchronously (spawnSync would block it).
  const cli = (args: string[]): Promise<{ status: number; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      execFile(process.execPath, [...CLI_ARGS, ...args], { encoding: 'utf8', timeout: 20_000 }, (err, stdout, stderr) => {
        resolve({ status: err ? Number((err as { code?: unknown }).code ?? 1) : 0, stdout, stderr });
      });
    });

  it('`nbd-attach list --json` and `info --json` read our exports', async () => {
    const list = await cli(['list', '--json', `127.0.0.1:${srv.port}`]);
    assert.equal(list.status, 0, list.stderr);
    const l = JSON.parse(list.stdout) as { exports: { name: string; description: string; size: number; flagNames: string[] }[] };
    assert.deepEqual(l.exports.map((e) => [e.name, e.description, e.size]), [
      ['alpha', 'first disk', 8 << 20],
      ['beta', 'memory 1 MiB', 1 << 20],
    ]);
    assert.ok(l.exports[1]!.flagNames.includes('read_only'));
    const info = await cli(['info', '--json', `nbd://127.0.0.1:${srv.port}/beta`]);
    assert.equal(info.status, 0, info.stderr);
    const i = JSON.parse(info.stdout) as { name: string; size: number; flagNames: string[] };
    assert.equal(i.size, 1 << 20);
    assert.ok(i.flagNames.includes('read_only'));
  });
});
