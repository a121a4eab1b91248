// The service manager's readiness protocol, sd_notify(3), for `Type=notify` units
// (packaging/systemd/nbd-attach@.service): one datagram per message to the AF_UNIX socket named by
// $NOTIFY_SOCKET (`/path`, or `@name` in the abstract namespace), newline-separated KEY=VALUE lines:
// READY=1 once the device is usable, STATUS=<one line> for `systemctl status`, STOPPING=1 when
// shutting down, WATCHDOG=1 every half $WATCHDOG_USEC when the unit has WatchdogSec= (and
// $WATCHDOG_PID is unset or ours: sd_watchdog_enabled(3)), MAINPID=<pid> when another process takes
// over as the main one.
//
// Without $NOTIFY_SOCKET everything here is a no-op and the datagram code (koffi) is never loaded.
// Sending never throws into the caller: a failed send is logged once through the injected `log`.
// The formatting and the environment parsing are pure and exported for tests.
//
// Use, in the resident process (`-n`, or whichever process systemd knows as the main one):
//   const notifier = await createNotifier({ log });   // once, before anything is spawned
//   notifier.ready(deviceStatusText(state));          // once the device is usable (sysfs size set)
//   notifier.status(deviceStatusText(state));         // when connections drop or come back
//   notifier.stopping(`${device}: SIGTERM`);          // on SIGTERM/SIGINT, or once detached by -d
//   await notifier.flush(); notifier.close();         // before exiting

/** sd_notify(3) variables read here, and removed from the environment once read (see `unsetEnvironment`). */
export const NOTIFY_ENV = ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'] as const;

/** STATUS= text is cut to this many characters (systemd reads a notification into a PIPE_BUF = 4096 byte buffer). */
export const STATUS_MAX_CHARS = 512;

/** How long a message waits in total for a full notify socket (EAGAIN) before it is dropped, and the step. */
export const SEND_RETRY_MS = 20;
export const SEND_RETRY_LIMIT = 50;

export interface NotifyConfig {
  /** $NOTIFY_SOCKET when usable (`/path` or `@name`); undefined: notifications are off. */
  socket: string | undefined;
  /** Half of $WATCHDOG_USEC in ms, when the manager expects WATCHDOG=1 from this process. */
  watchdogIntervalMs: number | undefined;
  /** Why a variable that was set is not used (one line each), for the log. */
  problems: string[];
}

/**
 * Read the notification settings from an environment (pure). `pid` is this process's id, compared
 * with $WATCHDOG_PID as sd_watchdog_enabled(3) does: the watchdog is ours when $WATCHDOG_USEC is a
 * positive number and $WATCHDOG_PID is unset or equal to `pid`. A `vsock:` or relative
 * $NOTIFY_SOCKET is not supported and turns notifications off (with a problem line).
 */
export function parseNotifyEnvironment(env: Readonly<Record<string, string | undefined>>, pid: number): NotifyConfig {
  const problems: string[] = [];
  let socket: string | undefined;
  const raw = env['NOTIFY_SOCKET'];
  if (raw !== undefined && raw !== '') {
    if (raw.startsWith('/') || (raw.startsWith('@') && raw.length > 1)) socket = raw;
    else problems.push(`NOTIFY_SOCKET='${oneLine(raw, 80)}' is neither an absolute path nor @name: systemd notifications are off`);
  }
  let watchdogIntervalMs: number | undefined;
  const usec = env['WATCHDOG_USEC'];
  if (socket !== undefined && usec !== undefined && usec !== '') {
    const wpid = env['WATCHDOG_PID'];
    if (!/^\d{1,16}$/.test(usec) || Number(usec) === 0) {
      problems.push(`WATCHDOG_USEC='${oneLine(usec, 40)}' is not a positive number of microseconds: no watchdog pings`);
    } else if (wpid !== undefined && wpid !== '' && !/^\d+$/.test(wpid)) {
      problems.push(`WATCHDOG_PID='${oneLine(wpid, 40)}' is not a process id: no watchdog pings`);
    } else if (wpid === undefined || wpid === '' || Number(wpid) === pid) {
      watchdogIntervalMs = Math.max(1, Math.floor(Number(usec) / 2000));
    }
  }
  return { socket, watchdogIntervalMs, problems };
}

/**
 * One line of at most `max` characters: every run of control characters (newlines included, which
 * would start another KEY=VALUE line) becomes one space, the ends are trimmed, and a longer text is
 * cut with "…" (never inside a surrogate pair).
 */
export function oneLine(text: string, max: number = STATUS_MAX_CHARS): string {
  const flat = text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]+/g, ' ').trim();
  const chars = Array.from(flat);
  return chars.length <= max ? flat : `${chars.slice(0, Math.max(0, max - 1)).join('')}…`;
}

/** A notification message: KEY=VALUE lines joined by newlines (pure). Keys are sd_notify's upper-case names. */
export function formatNotifyMessage(fields: readonly (readonly [key: string, value: string])[]): Buffer {
  const lines = fields.map(([k, v]) => {
    if (!/^[A-Z][A-Z0-9_]*$/.test(k)) throw new Error(`notification key '${k}' is not an sd_notify name`);
    return `${k}=${oneLine(v)}`;
  });
  return Buffer.from(lines.join('\n'), 'utf8');
}

/** What STATUS= says about a supervised device; the supervisor's state file has these fields. */
export interface DeviceStatus {
  device: string;
  server: string;
  export: string;
  connections: number;
  liveConnections: number;
  reconnects?: number;
  lastError?: string | undefined;
}

/**
 * STATUS= text for a device (pure): "/dev/nbd0: export 'disk' on server:10809, connections 1/1"
 * plus ", reconnecting" when fewer connections are live than configured, the reconnect count when
 * there were any, and the last error while reconnecting.
 */
export function deviceStatusText(s: DeviceStatus): string {
  const exp = s.export === '' ? 'default export' : `export '${s.export}'`;
  let t = `${s.device}: ${exp} on ${s.server}, connections ${s.liveConnections}/${s.connections}`;
  const degraded = s.liveConnections < s.connections;
  if (degraded) t += ', reconnecting';
  if (s.reconnects) t += `, reconnects ${s.reconnects}`;
  if (degraded && s.lastError) t += `, last error: ${s.lastError}`;
  return oneLine(t);
}

export interface Notifier {
  /** True when $NOTIFY_SOCKET was set and usable. */
  readonly enabled: boolean;
  /** Half of $WATCHDOG_USEC in ms when this process pings the watchdog. */
  readonly watchdogIntervalMs: number | undefined;
  /** READY=1 (+ STATUS=, + MAINPID= when another process is the main one from now on). */
  ready(status?: string, opts?: { mainPid?: number }): void;
  /** STATUS=text (reconnects, degraded connections). */
  status(text: string): void;
  /** STOPPING=1 (+ STATUS=). Later ready() calls are ignored. */
  stopping(status?: string): void;
  /** One WATCHDOG=1 now (the timer sends them anyway). */
  watchdog(): void;
  /** Resolves once nothing waits for a full notify socket any more (sent or dropped). */
  flush(): Promise<void>;
  /** Stop the watchdog timer and drop what waits. */
  close(): void;
}

const NOOP: Notifier = {
  enabled: false,
  watchdogIntervalMs: undefined,
  ready: () => undefined,
  status: () => undefined,
  stopping: () => undefined,
  watchdog: () => undefined,
  flush: () => Promise.resolve(),
  close: () => undefined,
};

export interface NotifierOptions {
  /** Where failures and ignored settings are reported (one line each; a failing send only once). */
  log: (message: string) => void;
  /** Default process.env. */
  env?: Record<string, string | undefined>;
  /** Default process.pid. */
  pid?: number;
  /**
   * Remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from `env` once read (default true), as
   * sd_notify's `unset_environment`: a process we start (the compiler on first use, a helper) cannot
   * speak for the service. Pass false when a child started later is to take over as the main process
   * (it then needs them, and the parent sends `ready(…, { mainPid })`).
   */
  unsetEnvironment?: boolean;
  /** Send one datagram (tests); default: native-bindings/unix-dgram.ts, loaded only when enabled. */
  send?: (address: string, data: Uint8Array) => void;
}

/**
 * The Notifier for this process. No-op (and nothing loaded) without $NOTIFY_SOCKET. When
 * $WATCHDOG_USEC is for us, a WATCHDOG=1 timer (unref'd: it never keeps the process alive) runs at
 * half the period until close().
 */
export async function createNotifier(opts: NotifierOptions): Promise<Notifier> {
  const env = opts.env ?? process.env;
  const config = parseNotifyEnvironment(env, opts.pid ?? process.pid);
  if (opts.unsetEnvironment !== false) for (const k of NOTIFY_ENV) delete env[k];
  for (const p of config.problems) opts.log(p);
  if (config.socket === undefined) return NOOP;
  let send = opts.send;
  if (!send) {
    try {
      send = (await import('../../native-bindings/unix-dgram.ts')).sendDatagram;
    } catch (e) {
      opts.log(`systemd notifications are off: the datagram binding did not load (${(e as Error).message})`);
      return NOOP;
    }
  }
  return new SocketNotifier(config.socket, config.watchdogIntervalMs, send, opts.log);
}

class SocketNotifier implements Notifier {
  readonly enabled = true;
  private readonly queue: { data: Buffer; tries: number; watchdog: boolean }[] = [];
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly watchdogTimer: NodeJS.Timeout | undefined;
  private failureLogged = false;
  private isStopping = false;
  private flushWaiters: (() => void)[] = [];

  constructor(
    private readonly socket: string,
    readonly watchdogIntervalMs: number | undefined,
    private readonly sendFn: (address: string, data: Uint8Array) => void,
    private readonly log: (message: string) => void,
  ) {
    if (watchdogIntervalMs !== undefined) {
      this.watchdogTimer = setInterval(() => this.watchdog(), watchdogIntervalMs);
      this.watchdogTimer.unref();
    }
  }

  ready(status?: string, opts?: { mainPid?: number }): void {
    if (this.isStopping) return;
    const f: [string, string][] = [];
    if (opts?.mainPid !== undefined) f.push(['MAINPID', String(opts.mainPid)]);
    f.push(['READY', '1']);
    if (status !== undefined) f.push(['STATUS', status]);
    this.enqueue(formatNotifyMessage(f), false);
  }

  status(text: string): void {
    this.enqueue(formatNotifyMessage([['STATUS', text]]), false);
  }

  stopping(status?: string): void {
    this.isStopping = true;
    const f: [string, string][] = [['STOPPING', '1']];
    if (status !== undefined) f.push(['STATUS', status]);
    this.enqueue(formatNotifyMessage(f), false);
  }

  watchdog(): void {
    if (this.queue.some((m) => m.watchdog)) return; // one ping waiting is enough
    this.enqueue(formatNotifyMessage([['WATCHDOG', '1']]), true);
  }

  flush(): Promise<void> {
    if (this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push(resolve));
  }

  close(): void {
    if (this.watchdogTimer) clearInterval(this.watchdogTimer);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.queue.length = 0;
    this.settle();
  }

  private enqueue(data: Buffer, watchdog: boolean): void {
    this.queue.push({ data, tries: 0, watchdog });
    if (this.retryTimer === undefined) this.pump();
  }

  /** Send in order; a full socket (EAGAIN) is tried again a little later, anything else is dropped. */
  private pump(): void {
    this.retryTimer = undefined;
    while (this.queue.length > 0) {
      const m = this.queue[0]!;
      try {
        this.sendFn(this.socket, m.data);
      } catch (e) {
        const again = (e as { code?: unknown }).code === 'EAGAIN';
        if (again && ++m.tries < SEND_RETRY_LIMIT) {
          this.retryTimer = setTimeout(() => this.pump(), SEND_RETRY_MS);
          return;
        }
        this.fail(e as Error, m.data);
      }
      this.queue.shift();
    }
    this.settle();
  }

  private fail(e: Error, data: Buffer): void {
    if (this.failureLogged) return;
    this.failureLogged = true;
    const what = data.toString('utf8').split('\n')[0];
    this.log(`systemd notification (${what}) to ${this.socket} failed: ${e.message}; later failures are not logged`);
  }

  private settle(): void {
    if (this.queue.length > 0) return;
    for (const w of this.flushWaiters.splice(0)) w();
  }
}
