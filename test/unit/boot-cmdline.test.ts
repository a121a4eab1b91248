import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { bootReportAsShell, planAsShell, planBoot, shellQuote, splitCmdline, wantsNbdRoot, type BootPlan } from '../../src/boot/cmdline.ts';
import { NbdError } from '../../src/errors.ts';

const FLAGS = ['--systemd-mark', '--swap', '--persist'];
const base = 'console=ttyS0 ip=dhcp rw quiet';

function plan(cmdline: string, dhcp?: { rootPath?: string; rootServer?: string }, tlsDirPresent = false): BootPlan | undefined {
  return planBoot(`${base} ${cmdline}`, { ...(dhcp ? { dhcp } : {}), tlsDirPresent });
}
function fails(cmdline: string, pattern: RegExp, dhcp?: { rootPath?: string; rootServer?: string }): void {
  assert.throws(() => plan(cmdline, dhcp), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_USAGE' && pattern.test(e.message) && !e.message.includes('\n'));
}

test('splitCmdline: blanks separate, double quotes group', () => {
  assert.deepEqual(splitCmdline(' a=1  b="x y" c\n'), ['a=1', 'b=x y', 'c']);
  assert.deepEqual(splitCmdline(''), []);
});

test('no NBD root: undefined', () => {
  assert.equal(plan('root=/dev/sda1'), undefined);
  assert.equal(plan('root=UUID=1234 netroot=iscsi:1.2.3.4::::iqn'), undefined);
  assert.equal(wantsNbdRoot('root=/dev/sda1 ro'), false);
  assert.equal(wantsNbdRoot('x root=nbd:srv:disk'), true);
  assert.equal(wantsNbdRoot('nbdroot=srv,disk root=/dev/nbd0'), true);
  assert.equal(wantsNbdRoot('netroot=nbds://srv/disk'), true);
});

test("Debian nbdroot=SERVER,NAME,nbdX and root=/dev/nbdX", () => {
  const p = plan('nbdroot=10.0.2.100,rootfs,nbd1 root=/dev/nbd1');
  assert.deepEqual(p, { attachArgs: ['10.0.2.100', '/dev/nbd1', '--name', 'rootfs', ...FLAGS], device: '/dev/nbd1', root: '/dev/nbd1', form: 'nbdroot' });
  // root= wins over the third field, and may name a partition.
  const q = plan('nbdroot=srv,rootfs,nbd1 root=/dev/nbd2p1')!;
  assert.equal(q.device, '/dev/nbd2');
  assert.equal(q.root, '/dev/nbd2p1');
  // Two fields: a number is a port, anything else an export name; device from root=.
  assert.deepEqual(plan('nbdroot=srv,10810 root=/dev/nbd0')!.attachArgs, ['srv:10810', '/dev/nbd0', ...FLAGS]);
  assert.deepEqual(plan('nbdroot=srv,disk root=/dev/nbd0p1')!.attachArgs, ['srv', '/dev/nbd0', '--name', 'disk', ...FLAGS]);
  // nbddev= names the device too; nothing at all: nbd0.
  assert.equal(plan('nbdroot=srv,disk nbddev=/dev/nbd3')!.device, '/dev/nbd3');
  assert.equal(plan('nbdroot=srv,disk')!.device, '/dev/nbd0');
  // IPv6 in brackets, the attach form keeps them.
  assert.deepEqual(plan('nbdroot=[fd00::1],10809,nbd0')!.attachArgs.slice(0, 2), ['[fd00::1]:10809', '/dev/nbd0']);
});

test('Debian NFS-like nbdroot= forms', () => {
  assert.deepEqual(plan('nbdroot=srv:/disk root=/dev/nbd0')!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot=srv:10900/disk root=/dev/nbd0')!.attachArgs.slice(0, 4), ['srv:10900', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot=[::1]:/disk root=/dev/nbd0')!.attachArgs.slice(0, 4), ['[::1]', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot=[::1]:10900/a/b root=/dev/nbd0')!.attachArgs.slice(0, 4), ['[::1]:10900', '/dev/nbd0', '--name', 'a/b']);
  // No host: DHCP's server.
  assert.deepEqual(plan('nbdroot=/disk root=/dev/nbd0', { rootServer: '10.0.2.2' })!.attachArgs.slice(0, 4), ['10.0.2.2', '/dev/nbd0', '--name', 'disk']);
  fails('nbdroot=/disk root=/dev/nbd0', /names no server.*DHCP gave none/);
  fails('nbdroot=srv root=/dev/nbd0', /no export name or port/);
});

test('nbdroot=dhcp (or empty) takes the root-path; dhcp host takes the server', () => {
  assert.deepEqual(plan('nbdroot=dhcp root=/dev/nbd0', { rootPath: 'srv,disk' })!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot= root=/dev/nbd0', { rootPath: 'dhcp,disk', rootServer: '10.0.0.9' })!.attachArgs.slice(0, 4), ['10.0.0.9', '/dev/nbd0', '--name', 'disk']);
  // A device without nbdroot=: the root-path says where (nbd-client's script does the same).
  assert.deepEqual(plan('root=/dev/nbd0', { rootPath: 'srv:/disk' })!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.equal(plan('root=/dev/nbd0'), undefined);
  fails('nbdroot=dhcp root=/dev/nbd0', /root-path.*DHCP gave none/);
  // A dracut-style or URI root-path works through nbdroot=dhcp too.
  assert.deepEqual(plan('nbdroot=dhcp root=/dev/nbd1', { rootPath: 'nbd:srv:disk:ext4' })!.attachArgs.slice(0, 4), ['srv', '/dev/nbd1', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot=dhcp', { rootPath: 'nbd://srv:10810/disk' })!.attachArgs.slice(0, 2), ['nbd://srv:10810/disk', '/dev/nbd0']);
});

test("dracut root=nbd:SERVER:PORT_OR_EXPORT[:FSTYPE[:MOUNTOPTS[:NBDOPTS]]]", () => {
  assert.deepEqual(plan('root=nbd:10.0.2.100:10809'), { attachArgs: ['10.0.2.100:10809', '/dev/nbd0', ...FLAGS], device: '/dev/nbd0', root: '/dev/nbd0', form: 'dracut' });
  assert.deepEqual(plan('root=nbd:srv:disk:ext4:noatime,rw:timeout=30,bs=4096,conns=2'), {
    attachArgs: ['srv', '/dev/nbd0', '--name', 'disk', '--block-size', '4096', '--timeout', '30', '--connections', '2', ...FLAGS],
    device: '/dev/nbd0',
    root: '/dev/nbd0',
    fstype: 'ext4',
    mountOptions: 'noatime,rw',
    form: 'dracut',
  });
  assert.deepEqual(plan('root=nbd:srv:10810/disk')!.attachArgs.slice(0, 4), ['srv:10810', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('root=nbd:[fd00::5]:10810:auto')!.attachArgs.slice(0, 2), ['[fd00::5]:10810', '/dev/nbd0']);
  assert.equal(plan('root=nbd:[fd00::5]:10810:auto')!.fstype, undefined);
  assert.deepEqual(plan('root=nbd:srv:1:::ro,ioctl,no_optgo,tls,cacertfile=/etc/ca.pem,tlshostname=h')!.attachArgs, [
    'srv:1', '/dev/nbd0', '--read-only', '--ioctl', '--no-optgo', '--tls', '--cacertfile', '/etc/ca.pem', '--tlshostname', 'h', ...FLAGS,
  ]);
  assert.deepEqual(plan('root=nbd:srv:10809:::name=other')!.attachArgs.slice(0, 4), ['srv:10809', '/dev/nbd0', '--name', 'other']);
  // A partition: root=/dev/nbd0p1 with netroot=.
  const part = plan('root=/dev/nbd0p1 netroot=nbd:srv:disk')!;
  assert.equal(part.root, '/dev/nbd0p1');
  assert.equal(part.device, '/dev/nbd0');
  fails('root=nbd:fd00::5:10810', /IPv6 addresses go in brackets/);
  fails('root=nbd:srv:1:ext4:rw:tls:extra', /too many ':' fields/);
  fails('root=nbd:srv:99999', /port '99999'/);
  fails('root=nbd:srv:disk:ext4::frobnicate', /unknown option 'frobnicate'/);
  fails('root=nbd:srv:disk:ext4::bs=3', /bs= needs a whole number/);
  fails('root=nbd:srv:disk:ext4::unix', /unix sockets/);
});

test('netroot=: root= wins; netroot=dhcp reads the root-path', () => {
  assert.equal(plan('root=/dev/sda1 netroot=nbd:srv:disk'), undefined);
  assert.deepEqual(plan('root=/dev/root netroot=nbd:srv:disk')!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('netroot=nbd:srv:disk')!.form, 'dracut');
  assert.deepEqual(plan('root=nbd:a:x netroot=nbd:b:y')!.attachArgs[0], 'a');
  assert.deepEqual(plan('netroot=dhcp', { rootPath: 'nbd:srv:disk' })!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('root=dhcp', { rootPath: 'nbd:srv:disk' })!.attachArgs.slice(0, 4), ['srv', '/dev/nbd0', '--name', 'disk']);
  assert.equal(plan('netroot=dhcp', { rootPath: 'iscsi:1.2.3.4::::iqn' }), undefined);
  fails('netroot=dhcp', /root-path/);
  // The server from DHCP when the host field is empty.
  assert.deepEqual(plan('root=nbd::disk', { rootServer: '10.0.0.1' })!.attachArgs.slice(0, 2), ['10.0.0.1', '/dev/nbd0']);
});

test('URIs: root=nbd://, nbds:// (TLS material from the initramfs), the device from nbddev=', () => {
  assert.deepEqual(plan('root=nbd://srv:10810/disk'), { attachArgs: ['nbd://srv:10810/disk', '/dev/nbd0', ...FLAGS], device: '/dev/nbd0', root: '/dev/nbd0', form: 'uri' });
  assert.deepEqual(plan('root=nbds://srv/disk', {}, true)!.attachArgs, ['nbds://srv/disk', '/dev/nbd0', '--tls-certificates', '/etc/nbd-attach/initramfs-tls', ...FLAGS]);
  assert.deepEqual(plan('root=nbds://srv/disk', {}, false)!.attachArgs, ['nbds://srv/disk', '/dev/nbd0', ...FLAGS]);
  assert.deepEqual(plan('root=nbds://srv/disk?tls-certificates=/etc/x', {}, true)!.attachArgs, ['nbds://srv/disk?tls-certificates=/etc/x', '/dev/nbd0', ...FLAGS]);
  assert.equal(plan('root=nbd://srv/disk nbddev=/dev/nbd2p3')!.root, '/dev/nbd2p3');
  assert.equal(plan('root=/dev/nbd1p2 netroot=nbd://[::1]/disk')!.root, '/dev/nbd1p2');
  assert.equal(plan('nbdroot=nbd://srv/disk root=/dev/nbd1')!.device, '/dev/nbd1');
  fails('root=nbd+unix:///disk?socket=/x', /unix/);
  fails('root=nbds://srv/disk?bogus=1', /unknown parameter 'bogus'/);
  fails('root=nbd://srv/disk nbddev=/dev/sda', /not an nbd device/);
});

test('shell output survives a POSIX shell round trip', () => {
  assert.equal(shellQuote('a b'), "'a b'");
  assert.equal(shellQuote("it's"), "'it'\\''s'");
  const p = plan("root=nbd:srv:we\"ird name\":ext4:rw")!;
  const out = planAsShell(p);
  const script = `${out}\neval "set -- $NBDROOT_ARGS"\nfor a in "$@"; do printf '%s\\n' "$a"; done\necho "root=$NBDROOT_ROOT fs=$NBDROOT_FSTYPE opts=$NBDROOT_MOUNTOPTS form=$NBDROOT_FORM"`;
  const r = execFileSync('sh', ['-c', script], { encoding: 'utf8' }).trim().split('\n');
  assert.deepEqual(r, [...p.attachArgs, 'root=/dev/nbd0 fs=ext4 opts=rw form=dracut']);
  assert.ok(p.attachArgs.includes('weird name'));
});

test("DHCP root-path in both frameworks' forms: initramfs-tools' ROOTPATH (nbd-client's forms), dracut's new_root_path (nbd:…, URIs)", () => {
  // initramfs-tools: nbdroot=dhcp / empty / absent with root=/dev/nbdX; ROOTPATH in nbd-client's forms.
  assert.deepEqual(plan('nbdroot=dhcp root=/dev/nbd0', { rootPath: 'srv,10810' })!.attachArgs.slice(0, 2), ['srv:10810', '/dev/nbd0']);
  assert.deepEqual(plan('nbdroot=dhcp root=/dev/nbd0', { rootPath: 'srv:10810/disk' })!.attachArgs.slice(0, 4), ['srv:10810', '/dev/nbd0', '--name', 'disk']);
  assert.deepEqual(plan('nbdroot=dhcp root=/dev/nbd0p2', { rootPath: '[fd00::5]:/disk' })!.attachArgs.slice(0, 4), ['[fd00::5]', '/dev/nbd0', '--name', 'disk']);
  assert.equal(plan('nbdroot=dhcp root=/dev/nbd0p2', { rootPath: 'srv,disk' })!.root, '/dev/nbd0p2');
  // dracut: root=dhcp, netroot=dhcp (with root=/dev/root or none); root-path nbd:… with its fields, or a URI.
  const d = plan('root=dhcp', { rootPath: 'nbd:[fd00::5]:10810/disk:ext4:noatime' })!;
  assert.deepEqual(d.attachArgs.slice(0, 4), ['[fd00::5]:10810', '/dev/nbd0', '--name', 'disk']);
  assert.equal(d.fstype, 'ext4');
  assert.equal(d.mountOptions, 'noatime');
  assert.deepEqual(plan('root=/dev/root netroot=dhcp', { rootPath: 'nbd:srv:10810' })!.attachArgs.slice(0, 2), ['srv:10810', '/dev/nbd0']);
  assert.deepEqual(plan('root=dhcp', { rootPath: 'nbds://srv/disk' }, true)!.attachArgs.slice(0, 4), ['nbds://srv/disk', '/dev/nbd0', '--tls-certificates', '/etc/nbd-attach/initramfs-tls']);
  // A root-path for another protocol is someone else's; no root-path at all is an error that says so.
  assert.equal(plan('root=dhcp', { rootPath: 'nfs:srv:/export' }), undefined);
  fails('root=dhcp', /root-path.*DHCP gave none/);
});

test('boot report: the plan, the state and a one-line message, read back by a POSIX shell', () => {
  const p = plan('root=nbd:srv:disk:ext4')!;
  const text = bootReportAsShell(p, 'ready', "/dev/nbd0 attached: it's\nready");
  const out = execFileSync('sh', ['-c', `${text}\necho "$NBDROOT_STATE|$NBDROOT_DEVICE|$NBDROOT_FSTYPE|$NBDROOT_MESSAGE"`], { encoding: 'utf8' }).trim();
  assert.equal(out, "ready|/dev/nbd0|ext4|/dev/nbd0 attached: it's ready");
  const none = execFileSync('sh', ['-c', `${bootReportAsShell(undefined, 'none')}\necho "$NBDROOT_STATE|\${NBDROOT_DEVICE-unset}"`], { encoding: 'utf8' }).trim();
  assert.equal(none, 'none|unset');
});

/**
 * packaging/dracut/95nbd-attach/parse-nbd-attach.sh sourced as dracut does, with dracut-lib's
 * getarg/getargs over CMDLINE, and the shell variables root/netroot as they stand (dracut's
 * 40network/netroot.sh sets netroot to DHCP's root-path and sources the cmdline hooks again).
 */
function dracutParse(cmdline: string, vars: { root?: string; netroot?: string } = {}): { root: string; netroot: string; rootok: string; finished: boolean } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-dracut-parse-'));
  try {
    mkdirSync(path.join(dir, 'initqueue/finished'), { recursive: true });
    const hook = path.resolve('packaging/dracut/95nbd-attach/parse-nbd-attach.sh');
    const script = `
getarg() { _k=\${1%=}; _f=1; _v=; for _a in $CMDLINE; do case "$_a" in "$_k"=*) _v=\${_a#*=}; _f=0 ;; "$_k") _f=0 ;; esac; done; [ $_f = 0 ] && echo "$_v"; return $_f; }
getargs() { _f=1; for _a in $CMDLINE; do case "$_a" in "\${1%=}"=*) echo "\${_a#*=}"; _f=0 ;; esac; done; return $_f; }
incol2() { return 0; }
modprobe() { return 0; }
die() { echo "die: $*"; exit 1; }
hookdir=${JSON.stringify(dir)}
root=${JSON.stringify(vars.root ?? '')}
netroot=${JSON.stringify(vars.netroot ?? '')}
. ${JSON.stringify(hook)}
echo "root=$root"; echo "netroot=$netroot"; echo "rootok=$rootok"`;
    const out = execFileSync('sh', ['-c', script], { encoding: 'utf8', env: { ...process.env, CMDLINE: cmdline } });
    const v = Object.fromEntries(out.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    let finished = false;
    try {
      finished = readFileSync(path.join(dir, 'initqueue/finished/nbd-attach.sh'), 'utf8').includes('/sys/block/nbd');
    } catch {
      finished = false;
    }
    return { root: v['root'] ?? '', netroot: v['netroot'] ?? '', rootok: v['rootok'] ?? '', finished };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("dracut parse hook: root=nbd:…, URIs, nbdroot=, and root=dhcp / netroot=dhcp once DHCP's root-path is NBD", () => {
  assert.deepEqual(dracutParse('root=nbd:srv:10809 ip=dhcp'), { root: 'block:/dev/root', netroot: 'nbd:srv:10809', rootok: '1', finished: true });
  assert.deepEqual(dracutParse('root=nbds://srv/disk'), { root: 'block:/dev/root', netroot: 'nbds://srv/disk', rootok: '1', finished: true });
  assert.deepEqual(dracutParse('nbdroot=srv,disk root=/dev/nbd0p1'), { root: '/dev/nbd0p1', netroot: 'nbd:nbdroot', rootok: '1', finished: true });
  // First pass of root=dhcp: not ours yet (dracut's dhcp-root.sh says rootok and waits for a lease).
  assert.deepEqual(dracutParse('root=dhcp ip=dhcp'), { root: 'dhcp', netroot: '', rootok: '', finished: false });
  // Second pass, netroot = the lease's root-path: an NBD one is ours, in either form.
  assert.deepEqual(dracutParse('root=dhcp ip=dhcp', { root: 'dhcp', netroot: 'nbd:srv:disk' }), { root: 'block:/dev/root', netroot: 'nbd:srv:disk', rootok: '1', finished: true });
  assert.deepEqual(dracutParse('netroot=dhcp ip=dhcp', { netroot: 'nbds://srv/disk' }), { root: 'block:/dev/root', netroot: 'nbds://srv/disk', rootok: '1', finished: true });
  // Another protocol's root-path: left alone.
  assert.deepEqual(dracutParse('root=dhcp ip=dhcp', { root: 'dhcp', netroot: 'nfs:srv:/export' }), { root: 'dhcp', netroot: 'nfs:srv:/export', rootok: '', finished: false });
});

test('nbd-attach boot: a report for each outcome the script waits for (none; failed with exit 2 and the reason)', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-boot-cmd-'));
  try {
    const run = (cmdline: string): { status: number | null; report: string } => {
      const report = path.join(dir, 'sub', 'boot.env');
      rmSync(report, { force: true });
      const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/main.ts', 'boot', '--cmdline', cmdline, '--report', report], {
        encoding: 'utf8',
        env: { ...process.env, NBD_ATTACH_RUN_DIR: dir, NBD_ATTACH_LOG_DIR: dir },
      });
      const shown = execFileSync('sh', ['-c', `. '${report}'; echo "$NBDROOT_STATE|$NBDROOT_PID|$NBDROOT_MESSAGE|\${NBDROOT_DEVICE-}"`], { encoding: 'utf8' }).trim();
      return { status: r.status, report: shown };
    };
    const none = run('root=/dev/sda1 ro');
    assert.equal(none.status, 0);
    assert.match(none.report, /^none\|\d+\|-\|$/);
    const bad = run('root=nbd:srv:disk nbddev=/dev/sda');
    assert.equal(bad.status, 2);
    assert.match(bad.report, /^failed\|\d+\|kernel command line: nbddev= '\/dev\/sda' is not an nbd device.*\|$/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
