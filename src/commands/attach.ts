// `nbd-attach [attach] HOST[:PORT] [PORT] [DEV]`: negotiate an export and hand it to the kernel.
// The default command: src/cli.ts routes `nbd-attach HOST …` here.

import { readFileSync } from 'node:fs';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { looksLikePort } from '../address.ts';
import { NbdError } from '../errors.ts';
import { parseDeviceName } from '../kernel/device.ts';
import { type ServerOptions, addServerOptions, formatSize } from './common.ts';
import { addSupervisorOptions } from '../supervisor/options.ts';
import { RECONNECT_ATTEMPT_TIMEOUT_MS, backoffDelay } from '../supervisor/policy.ts';
import { takeDetachRequested } from '../supervisor/state.ts';
import type { SupervisedAttachOptions } from '../supervisor/run.ts';
import { DEFAULT_NBDTAB, findNbdtabEntry, nbdtabSettings, parseNbdtab } from '../nbdtab.ts';
import type { ConnectionSource } from '../supervisor/source.ts';

export interface AttachCliOptions extends ServerOptions {
  optgo: boolean;
  file?: string;
  memory?: string;
  blockSize?: number | 'preferred';
  timeout?: number;
  identifier?: string;
  readOnly?: boolean;
  ioctl?: boolean;
  nbdtab?: string;
  persist?: boolean;
  swap?: boolean;
  systemdMark?: boolean;
  deadTimeout?: number;
  connections?: number;
  reattach?: string;
}

/**
 * `nbd-attach nbd0`: the device alone, no server: look it up in /etc/nbdtab (or --nbdtab FILE) as
 * nbd-client does, and return the positionals and options it stands for. Options given on the
 * command line win over the file's. Anything else is returned unchanged.
 */
export function applyNbdtab(
  positionals: readonly (string | undefined)[],
  opts: AttachCliOptions,
  warn: (message: string) => void,
  read: (file: string) => string = (f) => readFileSync(f, 'utf8'),
): { positionals: (string | undefined)[]; opts: AttachCliOptions } {
  const given = positionals.filter((x): x is string => x !== undefined);
  const sole = given.length === 1 && parseDeviceName(given[0]!) !== undefined;
  const other = opts.file !== undefined || opts.memory !== undefined || opts.unix !== undefined || opts.reattach !== undefined;
  if (!sole || other) {
    if (opts.nbdtab !== undefined) throw new NbdError('NBD_E_USAGE', '--nbdtab is read when the device is the only argument (nbd-attach --nbdtab FILE nbd0)');
    return { positionals: [...positionals], opts };
  }
  const device = given[0]!;
  const file = opts.nbdtab ?? DEFAULT_NBDTAB;
  let text: string;
  try {
    text = read(file);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
    throw new NbdError('NBD_E_USAGE', `no server given for ${device}, and ${file} cannot be read (${code}): nbd-attach HOST[:PORT] ${device}, or add ${device} to ${file}`);
  }
  const entry = findNbdtabEntry(parseNbdtab(text, file), device);
  if (!entry) throw new NbdError('NBD_E_USAGE', `no server given for ${device}, and ${file} has no entry for it: nbd-attach HOST[:PORT] ${device}`);
  const t = nbdtabSettings(entry, file, warn);
  const o: AttachCliOptions = { ...opts };
  o.name ??= t.name;
  if (t.unix !== undefined) o.unix = t.unix;
  if (t.blockSize !== undefined) o.blockSize ??= t.blockSize;
  if (t.timeout !== undefined) o.timeout ??= t.timeout;
  if (t.deadTimeout !== undefined) o.deadTimeout ??= t.deadTimeout;
  if (t.connections !== undefined) o.connections ??= t.connections;
  if (t.optgo === false) o.optgo = false;
  if (t.swap) o.swap = true;
  if (t.tls) o.tls = true;
  for (const k of ['cacertfile', 'certfile', 'keyfile', 'tlshostname'] as const) if (t[k] !== undefined) o[k] ??= t[k];
  const dev = entry.device.startsWith('/') ? entry.device : `/dev/${entry.device}`;
  return { positionals: t.unix !== undefined ? [dev] : [t.host, t.port, dev], opts: o };
}

function positiveInt(what: string, max: number) {
  return (text: string): number => {
    if (!/^\d+$/.test(text) || Number(text) > max) throw new InvalidArgumentError(`'${text}' is not a valid ${what}`);
    return Number(text);
  };
}

/** Pure: split the positionals into host, port and device (`HOST PORT DEV`, `HOST DEV`, `-u SOCK DEV`). */
export function splitPositionals(args: readonly (string | undefined)[], unix: boolean): { host?: string; port?: string; device?: string } {
  const a = args.filter((x): x is string => x !== undefined);
  if (unix) {
    if (a.length > 1) throw new NbdError('NBD_E_USAGE', `with -u/--unix give only the device, not '${a.join(' ')}'`);
    return a[0] !== undefined ? { device: a[0] } : {};
  }
  const [host, second, third] = a;
  const out: { host?: string; port?: string; device?: string } = {};
  if (host !== undefined) out.host = host;
  if (second === undefined) return out;
  if (third !== undefined) {
    out.port = second;
    out.device = third;
  } else if (looksLikePort(second) && parseDeviceName(second) === undefined) {
    out.port = second;
  } else {
    out.device = second;
  }
  return out;
}

export function addKernelOptions(cmd: Command): Command {
  return cmd
    .addOption(
      new Option('-b, --block-size <bytes>', "device sector size: 512..page size, or 'preferred' for the server's preferred size (default 512, or the server's minimum when larger)").argParser(
        (text: string): number | 'preferred' => (text === 'preferred' ? 'preferred' : positiveInt('block size', 1 << 20)(text)),
      ),
    )
    .addOption(new Option('-t, --timeout <seconds>', 'request timeout: the kernel drops a connection whose request takes longer').argParser(positiveInt('timeout', 0x7fffffff)))
    .option('-i, --identifier <id>', 'backend identifier shown in /sys/block/nbdN/backend (default: random)')
    .option('-R, --read-only', 'attach read-only (the kernel refuses writes)')
    .option('-L, --ioctl', 'use the ioctl interface instead of netlink (stays in the foreground)');
}

export function register(program: Command): void {
  addSupervisorOptions(addKernelOptions(
    addServerOptions(program.command('attach'))
      .description('attach an export to /dev/nbdN (the default command: nbd-attach HOST[:PORT] [DEV])')
      .argument('[host]', 'HOST, HOST:PORT, [IPv6]:PORT or nbd:// URI')
      .argument('[port]', 'port, when given separately (nbd-client form HOST PORT DEV)')
      .argument('[device]', '/dev/nbdN, nbdN or any block node of major 43 (default: a free device)')
      .option('-g, --no-optgo', 'negotiate with NBD_OPT_EXPORT_NAME only (very old servers)')
      .option('--file <image>', 'local attach: serve IMAGE from this process on a socketpair (no server needed)')
      .option('--memory <size>', 'local attach: serve a sparse in-memory disk of SIZE (e.g. 1G) from this process')
      .option('--nbdtab <file>', 'with the device as the only argument, look it up here (default /etc/nbdtab, as nbd-client)')
      .option('-s, --swap', 'the device holds swap: keep the supervisor from the OOM killer (oom_score_adj -1000)')
      .option('-m, --systemd-mark', "start the supervisor's argv[0] with '@' so systemd leaves it running at shutdown (root or swap on NBD)")
      .option('-p, --persist', "accepted for nbd-client's sake: the supervisor always reconnects"),
  )).action(async (a1: string | undefined, a2: string | undefined, a3: string | undefined, given: AttachCliOptions) => {
    const warn = (m: string): void => void process.stderr.write(`nbd-attach: warning: ${m}\n`);
    // The background supervisor re-reads the same file; warnings are printed once, by the launcher.
    const { positionals, opts } = applyNbdtab([a1, a2, a3], given, (given as SupervisedAttachOptions).supervisorChild ? () => undefined : warn);
    // Loaded now, not at start-up: --help, check or list never need the supervisor (src/cli.ts).
    const { openSource, runSupervisedAttach } = await import('../supervisor/run.ts');
    // netlink: stay resident and reconnect (src/supervisor/); -L keeps the foreground ioctl path below.
    if (opts.ioctl !== true) return runSupervisedAttach(positionals, opts as AttachCliOptions & SupervisedAttachOptions);
    const { source, device } = await openSource(positionals, opts);
    try {
      await attachIoctl(source, device, opts);
    } finally {
      await source.close();
    }
  });
}

/** -L: this process holds the device through NBD_DO_IT; no netlink, so no supervised reconnect. */
async function attachIoctl(source: ConnectionSource, device: string | undefined, opts: AttachCliOptions): Promise<void> {
  const useIoctl = true;
  const { attach, ioctlDisconnect, preflight } = await import('../kernel/attach.ts');
  const { residentProcessSetup } = await import('../supervisor/run.ts');
  await preflight({ device, useIoctl });
  const conn = await source.connect(opts.connectTimeout);
  const notice = (m: string): void => {
    process.stderr.write(`nbd-attach: note: ${m}\n`);
  };
  const r = await attach({
    connections: [conn],
    device,
    blockSize: opts.blockSize,
    readOnly: opts.readOnly === true,
    timeout: opts.timeout,
    identifier: opts.identifier,
    useIoctl,
    notice,
  });
  const name = source.endpoint === undefined ? source.server : `export ${conn.info.name === '' ? '(default)' : `'${conn.info.name}'`}${source.tls ? ' over TLS' : ''}`;
  process.stdout.write(
    `${r.device} attached: ${formatSize(r.sizeBytes)} (${r.sizeBytes} bytes), ${name}, block size ${r.blockSize}${r.readOnly ? ', read-only' : ''}, ${r.interface}\n`,
  );
  if (!r.done) return;
  residentProcessSetup({ swap: opts.swap, systemdMark: opts.systemdMark, device: r.device }, notice);
  takeDetachRequested(r.index); // a marker left by an earlier detach of this device is not for us
  // ioctl: this process is the device's lifeline. Signals reach this (main) thread only; answer
  // them with a clean DISCONNECT, then wait for NBD_DO_IT to return in the worker.
  let stopping = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    stopping = true;
    notice(`${sig}: disconnecting ${r.device}`);
    try {
      ioctlDisconnect(r.device);
    } catch (e) {
      process.stderr.write(`nbd-attach: disconnect ${r.device} failed: ${(e as Error).message}\n`);
    }
  };
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, onSignal);
  try {
    let done: Promise<{ ret: number; message?: string }> = r.done;
    for (;;) {
      const end = await done;
      // DO_IT returns 0 both after a DISCONNECT and when the connection died: `nbd-attach -d` leaves a
      // marker (takeDetachRequested), a signal sets `stopping`. Otherwise the link died: reconnect
      // like nbd-client -persist. The kernel cannot hold I/O in ioctl mode, so requests
      // issued meanwhile fail with EIO (netlink mode keeps them waiting instead; docs/decisions.md).
      if (stopping || takeDetachRequested(r.index)) {
        if (end.ret < 0 && end.message) process.stderr.write(`nbd-attach: ${r.device}: ${end.message}\n`);
        break;
      }
      process.stderr.write(`nbd-attach: ${r.device}: the connection died${end.message ? ` (${end.message})` : ''}: reconnecting (ioctl mode: I/O fails until then)\n`);
      const again = await reconnectIoctl(source, r.device, opts, notice, () => stopping);
      if (!again) break;
      process.stderr.write(`nbd-attach: ${r.device} reconnected\n`);
      done = again.done;
    }
  } finally {
    for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.off(s, onSignal);
  }
  process.stderr.write(`nbd-attach: ${r.device} disconnected\n`);
}

/** Negotiate and hand a new connection to the same device with the ioctls, retrying with backoff. */
async function reconnectIoctl(
  source: ConnectionSource,
  device: string,
  opts: AttachCliOptions,
  notice: (m: string) => void,
  stopping: () => boolean,
): Promise<{ done: Promise<{ ret: number; message?: string }> } | undefined> {
  const { attach } = await import('../kernel/attach.ts');
  for (let attempt = 0; !stopping(); attempt++) {
    try {
      const conn = await source.connect(Math.min(opts.connectTimeout, RECONNECT_ATTEMPT_TIMEOUT_MS));
      const r = await attach({ connections: [conn], device, blockSize: opts.blockSize, readOnly: opts.readOnly === true, timeout: opts.timeout, useIoctl: true, notice });
      if (!r.done) throw new Error('the kernel did not start NBD_DO_IT');
      return { done: r.done }; // wrapped: an async function would otherwise wait for DO_IT to end
    } catch (e) {
      if (attempt % 10 === 0) process.stderr.write(`nbd-attach: ${device}: reconnect failed: ${(e as Error).message}\n`);
      await new Promise((res) => setTimeout(res, backoffDelay(attempt, Math.random())));
    }
  }
  return undefined;
}
