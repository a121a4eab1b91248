// Where the server is: HOST[:PORT], "HOST PORT" (the nbd-client form), [v6]:PORT, a unix socket path,
// or an NBD URI (NetworkBlockDevice/nbd doc/uri.md). Pure: parsing only, no lookups.

import { NbdError } from './errors.ts';
import { DEFAULT_PORT } from './protocol/constants.ts';

export type Endpoint = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/**
 * How to do TLS with the server (src/client/tls.ts). Paths only, never key material: this is also
 * what the supervisor's state file keeps so a reconnect or `--reattach` negotiates TLS the same way.
 */
export interface TlsSettings {
  /** Name the server's certificate must carry (default: the host; 'localhost' over a unix socket). */
  hostname?: string;
  /** Trusted CA certificates (PEM); default certificatesDir/ca-cert.pem, else the system's CAs. */
  caFile?: string;
  /** Client certificate and key (PEM) for servers that verify clients; default certificatesDir/client-*.pem. */
  certFile?: string;
  keyFile?: string;
  /** libnbd's and qemu's layout: ca-cert.pem, client-cert.pem, client-key.pem. */
  certificatesDir?: string;
  /** Check the server's certificate and name (default true; uri.md tls-verify-peer). */
  verifyPeer?: boolean;
  /** Pre-shared keys instead of certificates: IDENTITY:HEXKEY lines (psktool's format). */
  pskFile?: string;
  /** PSK identity (default: the login name, as uri.md's userinfo and libnbd). */
  username?: string;
  /** --tls-relay: keep TLS in a relay process instead of handing the session to kernel TLS. */
  relay?: boolean;
}

export interface Target {
  endpoint: Endpoint;
  /** Export name from a URI path; undefined when the address did not name one. */
  exportName?: string;
  /**
   * TLS settings when TLS is required (nbds://, nbds+unix://, -x/--tls), else false. uri.md: "If
   * encryption cannot be negotiated then the connection MUST fail".
   */
  tls: false | TlsSettings;
}

function usage(message: string): NbdError {
  return new NbdError('NBD_E_ADDRESS', message);
}

export function parsePort(text: string): number {
  if (!/^\d{1,5}$/.test(text)) throw usage(`port '${text}' is not a number between 1 and 65535`);
  const port = Number(text);
  if (port < 1 || port > 65535) throw usage(`port '${text}' is not a number between 1 and 65535`);
  return port;
}

/** True when `text` looks like a port number (used to tell "HOST PORT DEV" from "HOST DEV"). */
export function looksLikePort(text: string): boolean {
  return /^\d{1,5}$/.test(text);
}

export function isUri(text: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(text);
}

/**
 * uri.md's TLS parameters (tls-type, tls-hostname, tls-verify-peer) and libnbd's (tls-certificates,
 * tls-psk-file, tls-username), into settings. Pure.
 */
function tlsParam(settings: TlsSettings, key: string, value: string, text: string): boolean {
  switch (key) {
    case 'tls-type':
      if (value === 'anon') throw usage(`URI '${text}': tls-type=anon (no authentication) is not supported: use x509 or psk`);
      if (value !== 'x509' && value !== 'psk') throw usage(`URI '${text}': tls-type must be x509 or psk, not '${value}'`);
      return true; // x509 vs psk follows from tls-psk-file
    case 'tls-hostname':
      settings.hostname = value;
      return true;
    case 'tls-verify-peer':
      if (!/^(0|1|true|false)$/i.test(value)) throw usage(`URI '${text}': tls-verify-peer must be 0 or 1, not '${value}'`);
      settings.verifyPeer = /^(1|true)$/i.test(value);
      return true;
    case 'tls-certificates':
      settings.certificatesDir = value;
      return true;
    case 'tls-psk-file':
      settings.pskFile = value;
      return true;
    case 'tls-username':
      settings.username = value;
      return true;
  }
  return false;
}

export function parseUri(text: string): Target {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw usage(`'${text}' is not a valid NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`);
  }
  const scheme = url.protocol.replace(/:$/, '').toLowerCase();
  const schemes = ['nbd', 'nbds', 'nbd+unix', 'nbds+unix'];
  if (!schemes.includes(scheme)) {
    throw usage(`unknown URI scheme '${scheme}:' (use nbd://, nbds://, nbd+unix:// or nbds+unix://)`);
  }
  const tls = scheme.startsWith('nbds');
  const unix = scheme.endsWith('+unix');
  // uri.md "NBD URI export name": the path without its leading "/", percent-decoded.
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    throw usage(`URI '${text}': export name is not valid percent-encoding`);
  }
  let socket: string | undefined;
  const settings: TlsSettings = {};
  // uri.md "NBD URI authority": userinfo is the username for TLS authentication (PSK identity).
  if (url.username) {
    try {
      settings.username = decodeURIComponent(url.username);
    } catch {
      throw usage(`URI '${text}': user name is not valid percent-encoding`);
    }
  }
  for (const [key, value] of url.searchParams) {
    if (key === 'socket' && unix) socket = value;
    else if (key.startsWith('tls-')) {
      if (!tls) throw usage(`URI '${text}': '${key}' needs a TLS scheme (nbds:// or nbds+unix://)`);
      if (!tlsParam(settings, key, value, text)) throw usage(`URI '${text}': unknown parameter '${key}'`);
    } else throw usage(`URI '${text}': unknown parameter '${key}'`);
  }
  let endpoint: Endpoint;
  if (unix) {
    if (!socket) throw usage(`URI '${text}': ${scheme}:// needs ?socket=PATH`);
    if (url.host) throw usage(`URI '${text}': a unix-socket URI has no host (write ${scheme}:///EXPORT?socket=PATH)`);
    endpoint = { kind: 'unix', path: socket };
  } else {
    if (!url.hostname) throw usage(`URI '${text}': no host`);
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    endpoint = { kind: 'tcp', host, port: url.port ? parsePort(url.port) : DEFAULT_PORT };
  }
  return { endpoint, exportName, tls: tls ? settings : false };
}

/**
 * HOST, HOST:PORT, [V6], [V6]:PORT, a bare IPv6 address (more than one colon), or a URI.
 * `port` is the separate positional of the nbd-client form, if one was given.
 */
export function parseAddress(text: string, port?: string): Target {
  if (isUri(text)) {
    if (port !== undefined) throw usage(`a URI carries its own port: drop the extra '${port}'`);
    return parseUri(text);
  }
  if (text === '') throw usage('no server given');
  let host = text;
  let portText = port;
  const v6 = /^\[([^\]]+)\](?::(.*))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    if (v6[2] !== undefined) portText = conflict(portText, v6[2]);
  } else if ((text.match(/:/g) ?? []).length === 1) {
    const i = text.indexOf(':');
    host = text.slice(0, i);
    portText = conflict(portText, text.slice(i + 1));
  }
  if (host === '') throw usage(`'${text}': no host before the port`);
  return { endpoint: { kind: 'tcp', host, port: portText === undefined ? DEFAULT_PORT : parsePort(portText) }, tls: false };
}

function conflict(given: string | undefined, fromHost: string): string {
  if (given !== undefined && given !== fromHost) throw usage(`port given twice ('${fromHost}' and '${given}')`);
  return fromHost;
}

export function describeEndpoint(e: Endpoint): string {
  if (e.kind === 'unix') return `unix:${e.path}`;
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}
