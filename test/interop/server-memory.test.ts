// `nbd-attach serve` under a slow-reader flood: 4 connections pipeline 4 MiB READs and never read
// the replies, then close. The process's memory is bounded while it lasts (one payload budget for
// all connections) and given back once it ends.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Cmd, Opt } from '../../src/protocol/constants.ts';
import { encodeOption, encodeRequest } from '../../src/protocol/codec.ts';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// The built CLI (npm ci builds dist/): its memory is what a user's `serve` uses, without tsx's loader.
const BIN = path.join(REPO, 'dist/nbd-attach.mjs');
const CONNECTIONS = 4;
const READS = 64; // per connection: 256 × 4 MiB in all
const READ_SIZE = 4 * 1024 * 1024;
/** What the process may keep once the flood is over (an idle `serve` is ~45-60 MB). */
const AFTER_LIMIT = 100 * 1024 * 1024;

const rssOf = (pid: number): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
const MB = (n: number): string => `${(n / 1e6).toFixed(0)} MB`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const child = spawn(process.execPath, [BIN, 'serve', '--memory', '1G', '--port', '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
after(() => {
  child.kill('SIGKILL');
});

it('slow-reader flood: RSS bounded during it and back under 100 MB after it', { timeout: 90_000 }, async () => {
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`serve did not start: ${out}`)), 20_000);
    child.stdout!.on('data', (d: Buffer) => {
      out += d;
      const m = /listening on 127\.0\.0\.1:(\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
  });
  const pid = child.pid!;
  const idle = rssOf(pid);
  const sockets: net.Socket[] = [];
  for (let i = 0; i < CONNECTIONS; i++) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => undefined);
    await new Promise((r) => s.once('connect', r));
    // Fixed newstyle, NBD_FLAG_C_NO_ZEROES, NBD_OPT_EXPORT_NAME: no reply to wait for besides the
    // export info, which is never read either.
    const reqs = [Buffer.from('00000003', 'hex'), encodeOption(Opt.EXPORT_NAME, Buffer.from('memory'))];
    for (let r = 0; r < READS; r++) reqs.push(encodeRequest({ flags: 0, type: Cmd.READ, cookie: BigInt(r), offset: BigInt(r * READ_SIZE), length: READ_SIZE }));
    s.write(Buffer.concat(reqs));
    s.pause(); // never read
    sockets.push(s);
  }
  let peak = 0;
  for (let t = 0; t < 30; t++) {
    await sleep(100);
    peak = Math.max(peak, rssOf(pid));
  }
  for (const s of sockets) s.destroy();
  const t0 = Date.now();
  let now = rssOf(pid);
  while (now >= AFTER_LIMIT && Date.now() - t0 < 20_000) {
    await sleep(250);
    now = rssOf(pid);
  }
  console.log(`# serve RSS: idle ${MB(idle)}, flood peak ${MB(peak)}, ${MB(now)} ${Date.now() - t0} ms after the clients closed`);
  assert.ok(peak < 250 * 1024 * 1024, `peak ${MB(peak)}: the payload budget bounds the process`);
  assert.ok(now < AFTER_LIMIT, `RSS still ${MB(now)} 20 s after the flood ended`);
});
