// `nbd-attach [attach] HOST[:PORT] [PORT] [DEV]`: negotiate an export and hand it to the kernel.
// The default command: src/cli.ts routes `nbd-attach HOST …` here.

import { readFileSync } from 'node:fs';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { looksLikePort } from '../address.ts';
import { NbdError } from '../errors.ts';
import { parseDeviceName } from '../kernel/device.ts';
import { type ServerOptions, addServerOptions, resolveTarget } from './common.ts';
import { addSupervisorOptions } from '../supervisor/options.ts';
import type { AttachSpec, SupervisedAttachOptions } from '../supervisor/run.ts';
import { DEFAULT_NBDTAB, findNbdtabEntry, nbdtabSettings, parseNbdtab } from '../nbdtab.ts';

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
    .option('-L, --ioctl', 'use the ioctl interface instead of netlink (no I/O held across a reconnect; the process holding the device stays in the background, or the foreground with -n)');
}

/** The attach command's arguments and options on `cmd` (no action): `register`, and `boot` (src/commands/boot.ts). */
export function defineAttach(cmd: Command): Command {
  return addSupervisorOptions(addKernelOptions(
    addServerOptions(cmd)
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
  ));
}

export function register(program: Command): void {
  defineAttach(program.command('attach')).action(async (a1: string | undefined, a2: string | undefined, a3: string | undefined, given: AttachCliOptions) => {
    const warn = (m: string): void => void process.stderr.write(`nbd-attach: warning: ${m}\n`);
    // The background supervisor re-reads the same file; warnings are printed once, by the launcher.
    const { positionals, opts } = applyNbdtab([a1, a2, a3], given, (given as SupervisedAttachOptions).supervisorChild ? () => undefined : warn);
    // Netlink: a resident supervisor that reconnects; -L: the ioctl lifeline (src/supervisor/).
    // Loaded now, not at start-up: --help, check or list never need the supervisor (src/cli.ts).
    const { runSupervisedAttach } = await import('../supervisor/run.ts');
    return runSupervisedAttach(attachSpec(positionals, opts), opts as AttachCliOptions & SupervisedAttachOptions);
  });
}

/**
 * What the command line asks for, resolved: `HOST[:PORT] [PORT] [DEV]`, `-u SOCK [DEV]`, a URI,
 * local attach `--file IMAGE [DEV]` / `--memory SIZE [DEV]`, or `--reattach DEV [HOST]`.
 */
export function attachSpec(positionals: readonly (string | undefined)[], opts: AttachCliOptions): AttachSpec {
  if (opts.reattach !== undefined) {
    if (opts.file !== undefined || opts.memory !== undefined) throw new NbdError('NBD_E_USAGE', '--reattach adopts a device attached to a server: drop --file/--memory');
    const { host, port, device } = splitPositionals(positionals, opts.unix !== undefined);
    if (device !== undefined) throw new NbdError('NBD_E_USAGE', `--reattach ${opts.reattach} names the device: drop '${device}'`);
    const given = host !== undefined || opts.unix !== undefined ? resolveTarget(host, port, opts) : undefined;
    return { kind: 'reattach', device: opts.reattach, given };
  }
  if (opts.file !== undefined || opts.memory !== undefined) {
    const given = positionals.filter((x): x is string => x !== undefined);
    const what = opts.file !== undefined ? `--file ${opts.file}` : `--memory ${opts.memory}`;
    if (opts.file !== undefined && opts.memory !== undefined) throw new NbdError('NBD_E_USAGE', 'give --file or --memory, not both');
    if (opts.swap) {
      throw new NbdError('NBD_E_USAGE', `${what} with -s/--swap: swapping to a disk served by this same machine can deadlock under memory pressure; swap needs a remote server`);
    }
    if (given.length > 1 || opts.unix !== undefined || opts.name !== undefined) {
      throw new NbdError('NBD_E_USAGE', `${what} serves the image from this process: give only the device (nbd-attach ${what} [/dev/nbdN]), no server or export`);
    }
    if (given[0] !== undefined && parseDeviceName(given[0]) === undefined && !given[0].startsWith('/')) {
      throw new NbdError('NBD_E_USAGE', `${what}: '${given[0]}' is not a device (/dev/nbdN or nbdN)`);
    }
    return { kind: 'local', file: opts.file, memory: opts.memory, device: given[0] };
  }
  const { host, port, device } = splitPositionals(positionals, opts.unix !== undefined);
  const { target, exportName } = resolveTarget(host, port, opts);
  return { kind: 'remote', target, exportName, device };
}
