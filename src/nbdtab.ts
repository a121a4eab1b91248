// /etc/nbdtab, as nbd-client reads it (NetworkBlockDevice/nbd man/nbdtab.5): `nbd-attach nbd0` with
// the device's short name as the only argument attaches what the file says for it. One entry per
// line: DEVICE HOST-OR-SOCKET EXPORT [OPTION,OPTION…]; `#` starts a comment. Options are nbd-client's
// command-line options by another name; unknown ones are warned about unless they start with `_`
// (reserved for local use). Pure: text in, entries and option values out.

import { NbdError } from './errors.ts';

export const DEFAULT_NBDTAB = '/etc/nbdtab';

export interface NbdtabEntry {
  /** Short device name as written: "nbd0". */
  device: string;
  /** Host name or address; with the `unix` option, the socket path. */
  host: string;
  export: string;
  /** Options in order: `name` or `name=value`. */
  options: { name: string; value?: string }[];
  line: number;
}

/** Parse the whole file; a line with fewer than three fields is an error naming it. */
export function parseNbdtab(text: string, file: string): NbdtabEntry[] {
  const entries: NbdtabEntry[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/#.*$/, '').trim();
    if (line === '') return;
    const fields = line.split(/[ \t]+/);
    if (fields.length < 3 || fields.length > 4) {
      throw new NbdError('NBD_E_USAGE', `${file} line ${i + 1}: expected DEVICE HOST EXPORT [OPTIONS], got ${fields.length} field(s)`);
    }
    const options = (fields[3] ?? '')
      .split(',')
      .filter((o) => o !== '')
      .map((o) => {
        const eq = o.indexOf('=');
        return eq < 0 ? { name: o } : { name: o.slice(0, eq), value: o.slice(eq + 1) };
      });
    entries.push({ device: fields[0]!.replace(/^\/dev\//, ''), host: fields[1]!, export: fields[2]!, options, line: i + 1 });
  });
  return entries;
}

/** What an entry asks for, in the names of attach's options. */
export interface NbdtabSettings {
  host?: string;
  port?: string;
  unix?: string;
  name: string;
  blockSize?: number;
  timeout?: number;
  deadTimeout?: number;
  connections?: number;
  optgo?: false;
  swap?: true;
  tls?: true;
  cacertfile?: string;
  certfile?: string;
  keyfile?: string;
  tlshostname?: string;
}

/** Turn an entry's options into settings; `warn` gets one line per option that is ignored. */
export function nbdtabSettings(e: NbdtabEntry, file: string, warn: (message: string) => void): NbdtabSettings {
  const where = `${file} line ${e.line} (${e.device})`;
  const out: NbdtabSettings = { name: e.export };
  let unix = false;
  const int = (name: string, value: string | undefined, min: number, max: number): number => {
    if (value === undefined || !/^\d+$/.test(value) || Number(value) < min || Number(value) > max) {
      throw new NbdError('NBD_E_USAGE', `${where}: ${name}= needs a whole number between ${min} and ${max}, not '${value ?? ''}'`);
    }
    return Number(value);
  };
  const text = (name: string, value: string | undefined): string => {
    if (!value) throw new NbdError('NBD_E_USAGE', `${where}: ${name}= needs a value`);
    return value;
  };
  for (const { name, value } of e.options) {
    switch (name) {
      case 'port':
        out.port = String(int(name, value, 1, 65535));
        break;
      case 'bs':
        out.blockSize = int(name, value, 512, 1 << 20);
        break;
      case 'timeout':
        out.timeout = int(name, value, 0, 0x7fffffff);
        break;
      case 'dead-timeout':
      case 'dead_timeout':
        out.deadTimeout = int(name, value, 0, 0x7fffffff);
        break;
      case 'conns':
        out.connections = int(name, value, 1, 16);
        break;
      case 'certfile':
      case 'keyfile':
      case 'cacertfile':
      case 'tlshostname':
        out[name] = text(name, value);
        break;
      case 'tls':
        out.tls = true;
        break;
      case 'no_optgo':
        out.optgo = false;
        break;
      case 'swap':
        out.swap = true;
        break;
      case 'unix':
        unix = true;
        break;
      case 'persist':
        break; // the supervisor always reconnects
      case 'priority':
        warn(`${where}: priority= (a GnuTLS priority string) is ignored: nbd-attach's TLS is Node's OpenSSL`);
        break;
      case 'preinit':
        throw new NbdError('NBD_E_USAGE', `${where}: preinit (attach without a handshake) is not supported: remove it`);
      default:
        if (!name.startsWith('_')) warn(`${where}: unknown option '${name}' ignored`);
    }
  }
  if (unix) {
    if (out.port !== undefined) throw new NbdError('NBD_E_USAGE', `${where}: unix and port= do not go together`);
    out.unix = e.host;
  } else {
    out.host = e.host;
  }
  return out;
}

/** The entry for a device ("nbd0" or "/dev/nbd0"), or undefined. */
export function findNbdtabEntry(entries: readonly NbdtabEntry[], device: string): NbdtabEntry | undefined {
  const short = device.replace(/^\/dev\//, '');
  return entries.find((e) => e.device === short);
}
