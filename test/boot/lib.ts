// Real boots of a diskless machine whose root is on NBD: Debian's stock kernel (the test VM's cache,
// test/vm/setup.sh) with an initramfs built by the framework's own tool (mkinitramfs, dracut) with
// nbd-attach's hook installed, a root image built here (ext4, busybox), the server on the host's
// loopback, reached through qemu's user-mode network with restrict=on and a guestfwd to a relay
// command (relay.mjs). Nothing leaves the machine.

import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync, chmodSync } from 'node:fs';
import { randomBytes, createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { REPO, tmpDir } from '../lib/servers.ts';

export const CACHE = process.env['NBD_ATTACH_CACHE'] ?? path.join(process.env['HOME'] ?? '/root', '.cache/nbd-attach');

export function kernelVersion(): string {
  const ready = readFileSync(path.join(CACHE, 'ready'), 'utf8');
  const m = /^kver=(.+)$/m.exec(ready);
  if (!m) throw new Error(`${CACHE}/ready names no kernel: run test/vm/setup.sh --refresh`);
  return m[1]!;
}

export function kernelImage(): string {
  return path.join(CACHE, 'kernel-root/boot', `vmlinuz-${kernelVersion()}`);
}

/** Runs a command, throws with its output when it fails. */
export function must(cmd: string, args: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; cwd?: string; input?: string } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: opts.env ?? process.env, timeout: opts.timeoutMs ?? 300_000, cwd: opts.cwd, maxBuffer: 64 << 20, ...(opts.input !== undefined ? { input: opts.input } : {}) });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}${r.stdout}`.slice(0, 4000));
  return r.stdout;
}

/** Host packages and the kernel cache (test/boot/setup.sh). */
export function setup(): void {
  must('bash', [path.join(REPO, 'test/boot/setup.sh')], { timeoutMs: 900_000 });
}

/** /usr/lib/nbd-attach as the package lays it out, staged from this checkout. */
export function stageLib(dir: string): string {
  must('bash', [path.join(REPO, 'packaging/boot/stage-lib.sh'), dir]);
  return dir;
}

export interface RootImage {
  file: string;
  /** sha256 of /data inside it. */
  dataSha256: string;
}

/**
 * An ext4 image (built with mkfs.ext4 -d, no mount needed) holding static busybox and `init`
 * (test/boot/guest-init.sh), and /data: 4 MiB of random bytes the guest reads back. With
 * `partitioned`, the file system sits in partition 1 of an MBR-partitioned disk.
 */
export function buildRootImage(dir: string, opts: { sizeMiB?: number; partitioned?: boolean } = {}): RootImage {
  const tree = path.join(dir, 'tree');
  rmSync(tree, { recursive: true, force: true });
  for (const d of ['bin', 'sbin', 'proc', 'sys', 'dev', 'run', 'tmp', 'mnt', 'etc', 'root', 'usr']) mkdirSync(path.join(tree, d), { recursive: true });
  // Merged /usr, for a host /usr mounted over it (bt.lib: the running system runs nbd-attach).
  symlinkSync('usr/lib', path.join(tree, 'lib'));
  symlinkSync('usr/lib64', path.join(tree, 'lib64'));
  cpSync('/bin/busybox', path.join(tree, 'bin/busybox'));
  for (const applet of must('/bin/busybox', ['--list']).split('\n').filter((a) => a && a !== 'busybox')) {
    symlinkSync('busybox', path.join(tree, 'bin', applet));
  }
  cpSync(path.join(REPO, 'test/boot/guest-init.sh'), path.join(tree, 'sbin/init'));
  chmodSync(path.join(tree, 'sbin/init'), 0o755);
  const data = randomBytes(4 << 20);
  writeFileSync(path.join(tree, 'data'), data);
  writeFileSync(path.join(tree, 'etc/fstab'), '');
  const size = opts.sizeMiB ?? 64;
  const file = path.join(dir, 'root.img');
  rmSync(file, { force: true });
  if (!opts.partitioned) {
    must('mkfs.ext4', ['-q', '-F', '-L', 'nbdroot', '-E', 'lazy_itable_init=0,nodiscard', '-d', tree, file, `${size}M`]);
  } else {
    // Partition 1 from 1 MiB to the end; the file system is built apart and copied into place.
    const fs = path.join(dir, 'part1.img');
    must('mkfs.ext4', ['-q', '-F', '-L', 'nbdroot', '-E', 'lazy_itable_init=0,nodiscard', '-d', tree, fs, `${size - 1}M`]);
    must('truncate', ['-s', `${size}M`, file]);
    must('sfdisk', ['-q', file], { input: 'label: dos\nstart=2048, type=83\n' });
    must('dd', [`if=${fs}`, `of=${file}`, 'bs=1M', 'seek=1', 'conv=notrunc,sparse', 'status=none']);
    rmSync(fs);
  }
  return { file, dataSha256: createHash('sha256').update(data).digest('hex') };
}

/** `e2fsck -fn`: exit status 0 means clean. */
export function fsckClean(image: string): { clean: boolean; output: string } {
  const r = spawnSync('e2fsck', ['-fn', image], { encoding: 'utf8' });
  return { clean: r.status === 0, output: `${r.stdout}${r.stderr}` };
}

/** One file of an ext4 image, read with debugfs (no mount). */
export function readImageFile(image: string, file: string): string {
  return must('debugfs', ['-R', `cat ${file}`, image]).toString();
}

/**
 * An initramfs built by Debian's mkinitramfs for the cached kernel, from a configuration directory
 * of our own (MODULES=netboot: network drivers, no disk drivers; a netbooted machine's choice),
 * with nbd-attach's hook and boot script installed in it (`withNbdAttach`), or without (then
 * nbd-client's own hook, from the nbd-client package, is what attaches). The kernel's modules
 * are bound at /lib/modules/VERSION inside a private mount namespace: the host is not changed.
 */
export function buildInitramfsTools(out: string, opts: { withNbdAttach: boolean; lib?: string; extraModules?: readonly string[] }): void {
  const kver = kernelVersion();
  const conf = tmpDir('nbd-boot-conf-');
  try {
    for (const d of ['hooks', 'scripts/local-top', 'conf.d']) mkdirSync(path.join(conf, d), { recursive: true });
    writeFileSync(path.join(conf, 'initramfs.conf'), 'MODULES=netboot\nBUSYBOX=y\nCOMPRESS=zstd\nCOMPRESSLEVEL=1\nRUNSIZE=10%\nFSTYPE=ext4\n');
    writeFileSync(path.join(conf, 'modules'), ['ext4', ...(opts.extraModules ?? [])].join('\n') + '\n');
    if (opts.withNbdAttach) {
      cpSync(path.join(REPO, 'packaging/initramfs-tools/hooks/nbd-attach'), path.join(conf, 'hooks/nbd-attach'));
      cpSync(path.join(REPO, 'packaging/initramfs-tools/scripts/local-top/nbd-attach'), path.join(conf, 'scripts/local-top/nbd-attach'));
    }
    const env = { ...process.env, NBD_ATTACH_INITRAMFS: 'yes', ...(opts.lib ? { NBD_ATTACH_LIB: opts.lib } : {}) };
    const script = `set -e
mount --make-rprivate /
mount --bind ${q(path.join(CACHE, 'kernel-root/lib/modules'))} /lib/modules
mount --bind ${q(path.join(CACHE, 'kernel-root/boot'))} /boot
exec mkinitramfs -d ${q(conf)} -o ${q(out)} ${q(kver)}`;
    must('unshare', ['-m', 'sh', '-c', script], { env, timeoutMs: 600_000 });
  } finally {
    rmSync(conf, { recursive: true, force: true });
  }
}

/**
 * An initramfs built by dracut 059 (Debian's dracut-core + dracut-network, unpacked by
 * test/boot/setup.sh with dpkg -x into the cache, not installed: Debian's dracut and
 * initramfs-tools packages conflict) with packaging/dracut/95nbd-attach in its module directory,
 * the shell init (no systemd), network-legacy for ip=, and the cached kernel's modules. `tlsFrom`:
 * the directory the module copies into /etc/nbd-attach/initramfs-tls (NBD_ATTACH_TLS_FROM).
 */
export function buildDracut(out: string, opts: { lib: string; tlsFrom?: string }): void {
  const kver = kernelVersion();
  const base = tmpDir('nbd-boot-dracut-');
  try {
    cpSync(path.join(CACHE, 'dracut/root/usr/lib/dracut'), base, { recursive: true, verbatimSymlinks: true });
    cpSync(path.join(REPO, 'packaging/dracut/95nbd-attach'), path.join(base, 'modules.d/95nbd-attach'), { recursive: true });
    const confdir = path.join(base, 'conf.d');
    mkdirSync(confdir, { recursive: true });
    cpSync(path.join(REPO, 'packaging/dracut.conf.d/50-nbd-attach.conf'), path.join(confdir, '50-nbd-attach.conf'));
    const env = { ...process.env, dracutbasedir: base, NBD_ATTACH_LIB: opts.lib, ...(opts.tlsFrom ? { NBD_ATTACH_TLS_FROM: opts.tlsFrom } : {}) };
    must(path.join(CACHE, 'dracut/root/usr/bin/dracut'), [
      '--force', '--quiet', '--no-hostonly', '--no-hostonly-cmdline', '--no-early-microcode',
      '--conf', '/dev/null', '--confdir', confdir, '--tmpdir', base,
      '--kmoddir', path.join(CACHE, 'kernel-root/lib/modules', kver),
      '--modules', 'bash base rootfs-block kernel-modules kernel-network-modules network-legacy network udev-rules nbd-attach',
      '--drivers', 'ext4 virtio_net virtio_pci',
      '--zstd', out, kver,
    ], { env, timeoutMs: 600_000 });
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
}

function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export interface BootResult {
  console: string;
  /** Lines the guest init printed with the `BT:` prefix, without it. */
  lines: string[];
  /** key=value pairs of those lines (the last of each key wins). */
  values: Map<string, string>;
  exitCode: number | null;
  timedOut: boolean;
  wallMs: number;
}

export interface BootOptions {
  initrd: string;
  /** Kernel command line after the fixed part (console, panic). */
  append: string;
  /** The host port the guest reaches as 10.0.2.100:10809. */
  serverPort: number;
  timeoutMs: number;
  memMiB?: number;
  /** Instead of qemu's user-mode network: the tap device of a DhcpNet (qemu runs in its namespace). */
  tap?: DhcpNet;
  /** Share the host's root read-only over 9p (mount tag `host`; the initramfs needs 9p and 9pnet_virtio). */
  hostShare?: boolean;
  /** Called for each `BT:` line as it arrives (the test drives the server from here). */
  onLine?: (line: string) => void;
}

/** Guest address of the NBD server (guestfwd). */
export const GUEST_SERVER = '10.0.2.100';
/** Static guest address (qemu user-mode's default network 10.0.2.0/24, gateway 10.0.2.2). */
export const GUEST_IP = 'ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off net.ifnames=0';

export function boot(o: BootOptions): Promise<BootResult> {
  const relay = `cmd:${process.execPath} ${path.join(REPO, 'test/boot/relay.mjs')} ${o.serverPort}`;
  const bios = existsSync('/usr/share/qemu/qboot.rom') ? ['-bios', '/usr/share/qemu/qboot.rom'] : [];
  const netdev = o.tap ? `tap,id=n0,ifname=${o.tap.ifname},script=no,downscript=no` : `user,id=n0,restrict=on,guestfwd=tcp:${GUEST_SERVER}:10809-${relay}`;
  const args = [
    '-nographic', '-no-reboot', '-m', String(o.memMiB ?? 1024), '-smp', '2', '-cpu', 'max', ...bios,
    '-kernel', kernelImage(), '-initrd', o.initrd,
    '-append', `console=ttyS0 panic=-1 loglevel=4 ${o.append}`,
    '-netdev', netdev,
    '-device', 'virtio-net-pci,netdev=n0',
    ...(o.hostShare ? ['-virtfs', 'local,path=/,mount_tag=host,security_model=none,multidevs=remap,readonly=on'] : []),
  ];
  const start = Date.now();
  return new Promise((resolve) => {
    const qemu = o.tap
      ? spawn('ip', ['netns', 'exec', o.tap.netns, 'qemu-system-x86_64', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let pending = '';
    const lines: string[] = [];
    const values = new Map<string, string>();
    let timedOut = false;
    const onData = (b: Buffer): void => {
      const s = b.toString('utf8');
      out += s;
      if (process.env['BOOT_TEST_VERBOSE']) process.stderr.write(s);
      pending += s;
      let i;
      while ((i = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, i).replace(/\r$/, '');
        pending = pending.slice(i + 1);
        const m = /BT: (.*)$/.exec(line);
        if (m) {
          const l = m[1]!.trim();
          lines.push(l);
          for (const kv of l.matchAll(/([A-Za-z0-9_.-]+)=(\S*)/g)) values.set(kv[1]!, kv[2]!);
          try {
            o.onLine?.(l);
          } catch (e) {
            out += `\n[test] onLine failed: ${(e as Error).message}\n`;
          }
        }
      }
    };
    qemu.stdout.on('data', onData);
    qemu.stderr.on('data', onData);
    const timer = setTimeout(() => {
      timedOut = true;
      qemu.kill('SIGKILL');
    }, o.timeoutMs);
    qemu.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ console: out, lines, values, exitCode: code, timedOut, wallMs: Date.now() - start });
    });
  });
}

/** The tail of a console log, for assertion messages. */
export function tail(text: string, n = 60): string {
  return text.split('\n').slice(-n).join('\n');
}

export const tmp = (p: string): string => tmpDir(p);
export const cpus = os.cpus().length;

/**
 * A network of its own for a boot that takes its root from DHCP: a network namespace holding a tap
 * device (the VM's NIC, qemu runs inside the namespace), busybox udhcpd handing out leases with
 * the DHCP root-path option (17), and whatever servers the test starts there. Nothing in it
 * reaches the host's networks.
 */
export interface DhcpNet {
  netns: string;
  ifname: string;
  /** The host side's address in the namespace (the DHCP server, the router, the NBD server). */
  address: string;
  /** Runs a command inside the namespace; stopped by close(). */
  spawnInside(cmd: string, args: readonly string[]): void;
  close(): void;
}

export async function dhcpNet(dir: string, rootPath: string): Promise<DhcpNet> {
  const netns = `nbdboot${process.pid}`;
  const ifname = 'nbdtap0';
  const address = '10.77.0.1';
  const children: ReturnType<typeof spawn>[] = [];
  const close = (): void => {
    for (const c of children) c.kill('SIGKILL');
    spawnSync('ip', ['netns', 'del', netns]);
  };
  try {
    must('ip', ['netns', 'add', netns]);
    must('ip', ['-n', netns, 'link', 'set', 'lo', 'up']);
    must('ip', ['-n', netns, 'tuntap', 'add', 'dev', ifname, 'mode', 'tap']);
    must('ip', ['-n', netns, 'addr', 'add', `${address}/24`, 'dev', ifname]);
    must('ip', ['-n', netns, 'link', 'set', ifname, 'up']);
    const conf = path.join(dir, 'udhcpd.conf');
    writeFileSync(path.join(dir, 'udhcpd.leases'), '');
    // Option 17 (root path) as raw bytes: udhcpd splits a named option's value at commas, and
    // nbd-client's root-path form is "SERVER,PORT".
    const rootPathHex = Buffer.from(rootPath, 'utf8').toString('hex');
    writeFileSync(conf, [
      'start 10.77.0.15', 'end 10.77.0.20', `interface ${ifname}`, `lease_file ${path.join(dir, 'udhcpd.leases')}`,
      `pidfile ${path.join(dir, 'udhcpd.pid')}`, 'opt subnet 255.255.255.0', `opt router ${address}`, `opt 17 ${rootPathHex}`, '',
    ].join('\n'));
    const net: DhcpNet = {
      netns, ifname, address, close,
      spawnInside(cmd, args) {
        const c = spawn('ip', ['netns', 'exec', netns, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        c.stderr!.on('data', (b: Buffer) => void (err = (err + b.toString()).slice(-2000)));
        c.on('exit', (code, sig) => { if (code !== 0 && sig !== 'SIGKILL') process.stderr.write(`# ${cmd} in ${netns} exited ${code ?? sig}: ${err}\n`); });
        children.push(c);
      },
    };
    net.spawnInside('/bin/busybox', ['udhcpd', '-f', conf]);
    return net;
  } catch (e) {
    close();
    throw e;
  }
}
