// The kernel command lines that ask for a root file system on NBD, turned into the arguments of
// `nbd-attach` and the device the initramfs then mounts. Pure: text in, a plan out (the initramfs
// scripts get it through `nbd-attach boot-args`, see src/commands/boot-args.ts).
//
// Forms accepted (docs: /work/shared/notes/system.md; the scripts they come from):
// - nbd-client's Debian initramfs-tools script (nbd-client package, scripts/local-top/nbd):
//   `nbdroot=SERVER,PORT_OR_NAME[,nbdX]` with `root=/dev/nbdX[pN]` or `nbddev=`; the NFS-like
//   `nbdroot=HOST:/NAME`, `HOST:PORT/NAME`, `[V6]:/NAME`, `[V6]:PORT/NAME`; `nbdroot=dhcp` (or empty)
//   takes DHCP's root-path, an empty or `dhcp` host DHCP's server.
// - dracut's (modules.d/95nbd, dracut.cmdline(7)): `root=nbd:SERVER:PORT_OR_EXPORT[:FSTYPE[:MOUNTOPTS
//   [:NBDOPTS]]]`, also as `netroot=` (`root=` wins), IPv6 in brackets, PORT_OR_EXPORT may be
//   `PORT/EXPORT`; `netroot=dhcp` / `root=dhcp` read the same string from DHCP's root-path.
// - NBD URIs (NetworkBlockDevice/nbd doc/uri.md): `root=nbd://…`, `root=nbds://…`, `nbdroot=nbd://…`.
//
// NBDOPTS (dracut's comma-separated options) take /etc/nbdtab's option names (src/nbdtab.ts), plus
// `ro`, `ioctl`/`nonetlink`, `name=EXPORT` and `tls-certificates=DIR`.

import { NbdError } from '../errors.ts';
import { isUri, looksLikePort, parsePort, parseUri } from '../address.ts';
import { nbdtabSettings } from '../nbdtab.ts';

/** What the initramfs learnt from DHCP (initramfs-tools' ROOTPATH/ROOTSERVER, dracut's new_root_path). */
export interface DhcpInfo {
  rootPath?: string | undefined;
  rootServer?: string | undefined;
}

export interface BootPlan {
  /** Arguments for `nbd-attach` (the attach command), without the program name. */
  attachArgs: string[];
  /** The whole device attached: /dev/nbdN. */
  device: string;
  /** What to mount as root: the device or one of its partitions (/dev/nbdNpM). */
  root: string;
  /** File system type and mount options, when the command line names them (dracut's form). */
  fstype?: string;
  mountOptions?: string;
  /** Which form the command line used: 'nbdroot', 'dracut', 'uri'. */
  form: 'nbdroot' | 'dracut' | 'uri';
}

/** Options every root attach carries (docs/decisions.md "Root on NBD"). */
export const ROOT_ATTACH_FLAGS = ['--systemd-mark', '--swap', '--persist'] as const;

/** Directory the initramfs hooks copy TLS material into, used when an nbds:// URI names none. */
export const INITRAMFS_TLS_DIR = '/etc/nbd-attach/initramfs-tls';

function usage(message: string): NbdError {
  return new NbdError('NBD_E_USAGE', `kernel command line: ${message}`);
}

/**
 * Split a kernel command line into parameters as the kernel does (lib/cmdline.c next_arg): blanks
 * separate, double quotes group (and are removed).
 */
export function splitCmdline(text: string): string[] {
  const out: string[] = [];
  let cur = '';
  let quoted = false;
  let any = false;
  for (const ch of text) {
    if (ch === '"') {
      quoted = !quoted;
      any = true;
    } else if (!quoted && /\s/.test(ch)) {
      if (any) out.push(cur);
      cur = '';
      any = false;
    } else {
      cur += ch;
      any = true;
    }
  }
  if (any) out.push(cur);
  return out;
}

/** The last value of each parameter (the kernel and both frameworks let a later one win). */
function lastValues(params: readonly string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const p of params) {
    const eq = p.indexOf('=');
    if (eq > 0) m.set(p.slice(0, eq), p.slice(eq + 1));
  }
  return m;
}

/** True when the command line asks for an NBD root (cheap; the shell scripts do the same test). */
export function wantsNbdRoot(cmdline: string): boolean {
  const v = lastValues(splitCmdline(cmdline));
  const root = v.get('root') ?? '';
  const netroot = v.get('netroot') ?? '';
  return v.has('nbdroot') || SPEC_RE.test(root) || /^\/dev\/nbd/.test(root) || SPEC_RE.test(netroot);
}

/** A root spec: dracut's nbd:… or an NBD URI. */
const SPEC_RE = /^(nbd:|nbds?(\+unix)?:\/\/)/;

const DEVICE_RE = /^(?:\/dev\/)?(nbd\d+)(p\d+)?$/;

/** `/dev/nbd0p1` → { device: /dev/nbd0, root: /dev/nbd0p1 }. */
function deviceOf(text: string, what: string): { device: string; root: string } {
  const m = DEVICE_RE.exec(text);
  if (!m) throw usage(`${what} '${text}' is not an nbd device (expected /dev/nbdN or /dev/nbdNpM)`);
  return { device: `/dev/${m[1]}`, root: `/dev/${m[1]}${m[2] ?? ''}` };
}

/** A host for the attach command's HOST:PORT form (IPv6 in brackets). */
function hostPort(host: string, port: number | undefined): string {
  const h = host.includes(':') ? `[${host}]` : host;
  return port === undefined ? h : `${h}:${port}`;
}

/** Host (brackets removed) and the rest after `[v6]` or before the first separator. */
function splitHost(text: string, separators: RegExp): { host: string; rest: string } {
  const v6 = /^\[([^\]]*)\](.*)$/.exec(text);
  if (v6) return { host: v6[1]!, rest: v6[2]! };
  const i = text.search(separators);
  return i < 0 ? { host: text, rest: '' } : { host: text.slice(0, i), rest: text.slice(i) };
}

interface Server {
  host: string;
  port?: number;
  name?: string;
}

/** A server host from the command line; empty or `dhcp` means DHCP's server. */
function serverHost(host: string, dhcp: DhcpInfo, source: string): string {
  if (host !== '' && host !== 'dhcp') return host;
  if (!dhcp.rootServer) throw usage(`${source} names no server and DHCP gave none (write SERVER explicitly, or have the DHCP server send one)`);
  return dhcp.rootServer;
}

/** PORT, NAME or PORT/NAME. */
function portOrName(text: string, source: string): { port?: number; name?: string } {
  const slash = /^(\d{1,5})\/(.*)$/.exec(text);
  if (slash) return { port: parsePort(slash[1]!), name: slash[2]! };
  if (looksLikePort(text)) return { port: checkedPort(text, source) };
  return text === '' ? {} : { name: text };
}

function checkedPort(text: string, source: string): number {
  try {
    return parsePort(text);
  } catch {
    throw usage(`${source}: port '${text}' is not a number between 1 and 65535`);
  }
}

/** nbd-client's Debian `nbdroot=` value (not a URI, not dhcp). */
function parseNbdroot(value: string, dhcp: DhcpInfo): Server & { device?: string } {
  const src = `nbdroot=${value}`;
  const commas = value.split(',');
  if (commas.length > 3) throw usage(`${src}: expected SERVER,PORT_OR_NAME[,nbdX]`);
  if (commas.length >= 2) {
    const { port, name } = portOrName(commas[1]!, src);
    const host = serverHost(commas[0]!.replace(/^\[(.*)\]$/, '$1'), dhcp, src);
    return { host, ...(port !== undefined ? { port } : {}), ...(name !== undefined ? { name } : {}), ...(commas[2] ? { device: commas[2] } : {}) };
  }
  // NFS-like: HOST:/NAME, HOST:PORT/NAME, [V6]:/NAME, [V6]:PORT/NAME, /NAME.
  const { host, rest } = splitHost(value, /[:/]/);
  let tail = rest.replace(/^:/, '');
  let port: number | undefined;
  const p = /^(\d{1,5})(?:\/|$)(.*)$/.exec(tail);
  if (p) {
    port = checkedPort(p[1]!, src);
    tail = p[2]!;
  } else tail = tail.replace(/^\//, '');
  if (tail === '' && port === undefined) throw usage(`${src}: no export name or port (expected SERVER,PORT_OR_NAME or SERVER:/NAME)`);
  return { host: serverHost(host, dhcp, src), ...(port !== undefined ? { port } : {}), ...(tail !== '' ? { name: tail } : {}) };
}

/** dracut's `nbd:SERVER:PORT_OR_EXPORT[:FSTYPE[:MOUNTOPTS[:NBDOPTS]]]` (value after `nbd:`). */
function parseDracut(value: string, dhcp: DhcpInfo, src: string): Server & { fstype?: string; mountOptions?: string; nbdopts: string[] } {
  const { host, rest } = splitHost(value, /:/);
  // An IPv6 address without brackets ("nbd:fd00::5:10809") cannot be split: say so.
  if (!value.startsWith('[') && /^[0-9a-f]{0,4}::/i.test(value)) throw usage(`${src}: IPv6 addresses go in brackets: nbd:[ADDR]:PORT`);
  const fields = rest === '' ? [] : rest.replace(/^:/, '').split(':');
  if (rest !== '' && !rest.startsWith(':')) throw usage(`${src}: expected nbd:SERVER:PORT_OR_EXPORT[:FSTYPE[:MOUNTOPTS[:NBDOPTS]]]`);
  if (fields.length > 4) throw usage(`${src}: too many ':' fields (IPv6 addresses go in brackets: nbd:[ADDR]:PORT)`);
  const [po = '', fstype = '', mountOptions = '', nbdopts = ''] = fields;
  const { port, name } = portOrName(po, src);
  return {
    host: serverHost(host, dhcp, src),
    ...(port !== undefined ? { port } : {}),
    ...(name !== undefined ? { name } : {}),
    ...(fstype !== '' && fstype !== 'auto' ? { fstype } : {}),
    ...(mountOptions !== '' ? { mountOptions } : {}),
    nbdopts: nbdopts.split(',').filter((o) => o !== ''),
  };
}

/** dracut's NBDOPTS as attach options: nbdtab's names plus a few of nbd-client's flags. */
function nbdoptArgs(opts: readonly string[], src: string): { args: string[]; name?: string } {
  const args: string[] = [];
  const rest: { name: string; value?: string }[] = [];
  let name: string | undefined;
  for (const o of opts) {
    const eq = o.indexOf('=');
    const key = (eq < 0 ? o : o.slice(0, eq)).replace(/^-+/, '');
    const value = eq < 0 ? undefined : o.slice(eq + 1);
    if (key === 'ro' || key === 'readonly') args.push('--read-only');
    else if (key === 'ioctl' || key === 'nonetlink') args.push('--ioctl');
    else if (key === 'name' || key === 'N') {
      if (!value) throw usage(`${src}: name= needs an export name`);
      name = value;
    } else if (key === 'tls-certificates') {
      if (!value) throw usage(`${src}: tls-certificates= needs a directory`);
      args.push('--tls-certificates', value);
    } else if (key === 'unix') throw usage(`${src}: unix sockets cannot carry a root from the network: use SERVER:PORT`);
    else rest.push(value === undefined ? { name: key } : { name: key, value });
  }
  const warnings: string[] = [];
  const s = nbdtabSettings({ device: 'nbd', host: 'x', export: '', options: rest, line: 1 }, 'NBDOPTS', (w) => warnings.push(w));
  if (warnings.length > 0) throw usage(`${src}: ${warnings[0]!.replace(/^NBDOPTS line 1 \(nbd\): /, '')}`);
  if (s.port !== undefined) throw usage(`${src}: port= goes in the PORT field, not in NBDOPTS`);
  if (s.blockSize !== undefined) args.push('--block-size', String(s.blockSize));
  if (s.timeout !== undefined) args.push('--timeout', String(s.timeout));
  if (s.deadTimeout !== undefined) args.push('--dead-timeout', String(s.deadTimeout));
  if (s.connections !== undefined) args.push('--connections', String(s.connections));
  if (s.optgo === false) args.push('--no-optgo');
  if (s.tls) args.push('--tls');
  if (s.cacertfile) args.push('--cacertfile', s.cacertfile);
  if (s.certfile) args.push('--certfile', s.certfile);
  if (s.keyfile) args.push('--keyfile', s.keyfile);
  if (s.tlshostname) args.push('--tlshostname', s.tlshostname);
  return { args, ...(name !== undefined ? { name } : {}) };
}

export interface PlanOptions {
  dhcp?: DhcpInfo;
  /** Whether INITRAMFS_TLS_DIR exists in the initramfs (then an nbds:// URI without TLS files uses it). */
  tlsDirPresent?: boolean;
}

/**
 * The plan for a command line, or undefined when it asks for no NBD root. Throws a one-line
 * NbdError (code NBD_E_USAGE) saying what is wrong with a form it recognises but cannot use.
 */
export function planBoot(cmdline: string, options: PlanOptions = {}): BootPlan | undefined {
  const dhcp = options.dhcp ?? {};
  const v = lastValues(splitCmdline(cmdline));
  let root = v.get('root');
  let netroot = v.get('netroot');
  const nbdroot = v.get('nbdroot');
  const nbddev = v.get('nbddev');

  // dracut: root=dhcp / netroot=dhcp read root= from DHCP's root-path; nbdroot=dhcp (or empty) too.
  const fromDhcp = (src: string): string => {
    if (!dhcp.rootPath) throw usage(`${src} needs DHCP's root-path option, and DHCP gave none (is ip=dhcp set, and does the DHCP server send option 17?)`);
    return dhcp.rootPath;
  };
  if (root === 'dhcp' || (netroot === 'dhcp' && (root === undefined || root === '/dev/root' || root === 'dhcp'))) {
    const rp = fromDhcp(root === 'dhcp' ? 'root=dhcp' : 'netroot=dhcp');
    if (SPEC_RE.test(rp)) {
      root = rp;
      netroot = undefined;
    } else if (nbdroot === undefined) return undefined; // a root-path for another protocol
  }

  const rootIsDev = root !== undefined && DEVICE_RE.test(root);
  let spec: string | undefined;
  let specSource = '';
  if (root !== undefined && SPEC_RE.test(root)) {
    spec = root;
    specSource = `root=${root}`;
  } else if (netroot !== undefined && SPEC_RE.test(netroot) && (root === undefined || root === '/dev/root' || root === '' || root === 'dhcp' || rootIsDev)) {
    spec = netroot;
    specSource = `netroot=${netroot}`;
  }

  if (spec === undefined && nbdroot === undefined) {
    if (nbddev !== undefined || rootIsDev) {
      // nbd-client's script with a device but no nbdroot: DHCP's root-path says where.
      if (!dhcp.rootPath) return undefined;
    } else return undefined;
  }

  const flags = [...ROOT_ATTACH_FLAGS];
  if (spec !== undefined) {
    if (isUri(spec)) return uriPlan(spec, specSource, root !== spec && rootIsDev ? root! : nbddev, flags, options);
    const d = parseDracut(spec.slice('nbd:'.length), dhcp, specSource);
    const extra = nbdoptArgs(d.nbdopts, specSource);
    const name = extra.name ?? d.name;
    // dracut always attaches /dev/nbd0 (its nbdroot.sh); nbddev= may pick another.
    const dev = deviceOf(rootIsDev ? root! : (nbddev ?? '/dev/nbd0'), rootIsDev ? 'root=' : 'nbddev=');
    return {
      attachArgs: [hostPort(d.host, d.port), dev.device, ...(name !== undefined ? ['--name', name] : []), ...extra.args, ...flags],
      device: dev.device,
      root: dev.root,
      ...(d.fstype !== undefined ? { fstype: d.fstype } : {}),
      ...(d.mountOptions !== undefined ? { mountOptions: d.mountOptions } : {}),
      form: 'dracut',
    };
  }

  let value = nbdroot ?? '';
  if (value === '' || value === 'dhcp') value = fromDhcp(`nbdroot=${value}`);
  const devText = rootIsDev ? root! : nbddev;
  if (isUri(value)) return uriPlan(value, `nbdroot=${value}`, devText, flags, options);
  if (value.startsWith('nbd:')) {
    // A dracut-style root-path handed to nbd-client's form through DHCP.
    return planBoot(`root=${value}${devText ? ` nbddev=${devText.replace(/p\d+$/, '')}` : ''}`, options);
  }
  const s = parseNbdroot(value, dhcp);
  // root= overrides the third field (nbd-client's script does the same).
  const dev = deviceOf(devText ?? s.device ?? '/dev/nbd0', devText ? (rootIsDev ? 'root=' : 'nbddev=') : 'nbdroot= device');
  if (s.name === undefined && s.port === undefined) throw usage(`nbdroot=${value}: no export name or port`);
  return {
    attachArgs: [hostPort(s.host, s.port), dev.device, ...(s.name !== undefined ? ['--name', s.name] : []), ...flags],
    device: dev.device,
    root: dev.root,
    form: 'nbdroot',
  };
}

function uriPlan(uri: string, src: string, devText: string | undefined, flags: string[], options: PlanOptions): BootPlan {
  let target;
  try {
    target = parseUri(uri);
  } catch (e) {
    throw usage(`${src}: ${(e as Error).message}`);
  }
  if (target.endpoint.kind === 'unix') throw usage(`${src}: a unix-socket URI cannot carry a root from the network: use nbd://SERVER/EXPORT`);
  const dev = deviceOf(devText ?? '/dev/nbd0', 'root=');
  const tlsArgs: string[] = [];
  if (target.tls && !target.tls.certificatesDir && !target.tls.pskFile && options.tlsDirPresent) {
    tlsArgs.push('--tls-certificates', INITRAMFS_TLS_DIR);
  }
  return { attachArgs: [uri, dev.device, ...tlsArgs, ...flags], device: dev.device, root: dev.root, form: 'uri' };
}

/** Single-quote a word for a POSIX shell. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** The plan as shell assignments for the initramfs scripts (`eval "$(nbd-attach boot-args)"`). */
export function planAsShell(plan: BootPlan): string {
  const lines = [
    `NBDROOT_ARGS=${shellQuote(plan.attachArgs.map(shellQuote).join(' '))}`,
    `NBDROOT_DEVICE=${shellQuote(plan.device)}`,
    `NBDROOT_ROOT=${shellQuote(plan.root)}`,
    `NBDROOT_FSTYPE=${shellQuote(plan.fstype ?? '')}`,
    `NBDROOT_MOUNTOPTS=${shellQuote(plan.mountOptions ?? '')}`,
    `NBDROOT_FORM=${plan.form}`,
  ];
  return `${lines.join('\n')}\n`;
}

/** Where `nbd-attach boot` stands, as the boot scripts read it (NBDROOT_STATE). */
export type BootState = 'attaching' | 'ready' | 'failed' | 'none';

/**
 * The report `nbd-attach boot` keeps for the initramfs script that started it in the background
 * (sourced by it; replaced whole at each step): the plan's assignments, NBDROOT_STATE and a one-line
 * NBDROOT_MESSAGE (the ready line, or what failed).
 */
export function bootReportAsShell(plan: BootPlan | undefined, state: BootState, message = ''): string {
  const line = message.replace(/[\r\n]+/g, ' ');
  return `${plan ? planAsShell(plan) : ''}NBDROOT_STATE=${state}\nNBDROOT_MESSAGE=${shellQuote(line === '' ? '-' : line)}\n`;
}
